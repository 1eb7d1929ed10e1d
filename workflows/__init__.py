"""End-to-end pipelines composing the stages, one module per `wsi-mil` command (installed as wsi_mil.workflows)."""
