"""The one exception type the command line turns into a one-line message (no traceback)."""


class UserError(Exception):
    """Bad input from the user: a recipe, a data folder, a checkpoint, a device option."""
