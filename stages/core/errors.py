"""The one exception type that stages raise for problems a user can fix.

The CLI prints these as a single clear message (no traceback): what is wrong, which file,
and what to do about it.
"""


class UserError(Exception):
    """Bad input or an impossible request; the message names the file and the fix."""


class NoSpaceError(UserError):
    """A write failed or would fail for lack of disk space (or quota): what was written so
    far is kept where a rerun can resume from it."""
