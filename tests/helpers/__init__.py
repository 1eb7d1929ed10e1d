"""Test helpers shared by several test modules (synthetic slides and bags, real servers)."""
