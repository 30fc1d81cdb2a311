"""The one base class for failures a person can fix.

Every module's own error (bad audio, a bad data folder, a registry or ingest problem...)
derives from ``UserError`` so the CLI and the web app can report any of them as one line
(``.message``) without knowing where it came from.
"""

from __future__ import annotations


class UserError(Exception):
    """``message`` is one line: what went wrong and, where possible, what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
