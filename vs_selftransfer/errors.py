"""The one error type for input problems a user can fix (a bad flag, a missing file): the ``selftransfer``
command prints it as one line and exits with status 2. Both phases raise it, so it lives on the runtime side."""


class UserError(Exception):
    """An input problem the user can fix; printed as one line, exit status 2."""
