"""The one error type a user can act on.

``UserError`` is raised for a wrong setting, an impossible combination or a missing / corrupt
file; its message is one line naming the setting or file and what to do. The CLI prints it
and exits with status 2 *before any work starts*. Every other exception is a bug (or an
unexpected failure) and keeps its traceback. It subclasses ``ValueError`` so callers that
already catch ``ValueError`` keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message names the setting or file and the fix."""


class MissingFile(UserError, FileNotFoundError):
    """A file the user must create or point to is not there (the message says how)."""
