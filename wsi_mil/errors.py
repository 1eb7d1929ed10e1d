"""Errors that reach the user as one clear sentence (the CLI prints them and exits with code 2)."""


class WsiMilError(Exception):
    """A problem with the user's input or settings; the message names the file/key and the fix."""


class ConfigError(WsiMilError):
    """An invalid configuration: unknown key, wrong type, out-of-range value, missing file."""


class SlideError(WsiMilError):
    """A single slide cannot be processed (corrupt, unsupported, no MPP, no tissue...).

    Cohort stages catch it, record it for that slide and carry on with the others.
    """
