"""Credentials never leave the process: the one function that hides them in text that does.

Every string wsi-mil hands to MLflow (params, tags, text artifacts such as ``config.yaml``), to its
log lines and to its error messages goes through :func:`redact`:

- the password of a URI, ``http://user:secret@host`` -> ``http://user:***@host`` (the user name stays,
  so that the reader still knows which account was used);
- the value of a secret-looking query parameter, ``?token=abc`` -> ``?token=***``;
- the value of every secret environment variable (``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``,
  ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``...: a name ending in PASSWORD, TOKEN, SECRET, API_KEY,
  ACCESS_KEY, SECRET_KEY, ACCOUNT_KEY or CONNECTION_STRING), wherever it appears.

The objects themselves keep their credentials (the MLflow client must send them); only the copies
that leave are redacted. :class:`RedactingFormatter` applies the same function to every log line.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"

# scheme://user:password@ -> the password; user names and hosts stay readable
_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<secret>[^/\s@]+)(?P<at>@)")
_SECRET_QUERY = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pwd|token|access_token|auth|api_key|apikey|secret|sig|signature"
    r"|x-amz-signature|x-amz-security-token|x-amz-credential)=)(?P<secret>[^&#\s]+)",
    re.IGNORECASE,
)
_SECRET_ENV = re.compile(
    r"(PASSWORD|PASSWD|TOKEN|SECRET|API_KEY|ACCESS_KEY|SECRET_KEY|ACCOUNT_KEY|CONNECTION_STRING)$", re.IGNORECASE
)
# values that are settings rather than credentials: masking them would blank ordinary words
_NOT_SECRET = {"", "0", "1", "true", "false", "yes", "no", "on", "off", "none", "null"}
_MIN_ENV_SECRET = 4


def _env_secrets() -> list[str]:
    """Values of the secret environment variables now set, longest first."""
    values = {v.strip() for k, v in os.environ.items() if _SECRET_ENV.search(k)}
    return sorted((v for v in values if len(v) >= _MIN_ENV_SECRET and v.lower() not in _NOT_SECRET),
                  key=len, reverse=True)


def redact(text: object) -> str:
    """``text`` as a string with every credential replaced by ``***`` (see the module docstring).

    Parameters
    ----------
    text : object
        Any value; it is converted with ``str`` first.

    Returns
    -------
    str
        The same text with URI passwords, secret query values and the values of secret environment
        variables masked. Text without credentials comes back unchanged.
    """
    out = str(text)
    for value in _env_secrets():
        out = out.replace(value, MASK)
    out = _URI_PASSWORD.sub(lambda m: m["head"] + MASK + m["at"], out)
    return _SECRET_QUERY.sub(lambda m: m["head"] + MASK, out)


class RedactingFormatter(logging.Formatter):
    """A log formatter whose every line (message, arguments, traceback) has gone through :func:`redact`."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted record, redacted."""
        return redact(super().format(record))
