"""The project's one user-facing error type.

A user's mistake (a bad recipe, a missing file, an unknown name) raises a
`CapsxError`; the CLI prints its message as one red line and exits with
`exit_code`, never with a traceback. Bugs are `assert`s and do show one.
"""


class CapsxError(Exception):
    """A mistake the user can fix; the message says what is wrong and what was expected."""

    exit_code = 2  # usage / recipe


class RecipeError(CapsxError):
    """A recipe (file or override) that does not fit the schema."""


class DataError(CapsxError):
    """A data set that is missing, truncated or malformed on disk."""


class RunError(CapsxError):
    """Something failed while running (a diverged loss, an unusable checkpoint)."""

    exit_code = 1
