"""The one exception type the command line turns into a one-line message (no traceback), and how
that message is written."""

import sys


class UserError(Exception):
    """Bad input from the user: a recipe, a data folder, a checkpoint, a device option."""


class StoppedWithAnother(UserError):
    """A process stopping because another one failed, whose own message says why. Under --nproc,
    whose processes write to one terminal, that message is there already and this one is left
    unsaid; under torchrun, each machine's log needs it."""


def say_error(message: str) -> None:
    """'fastrsb: error: MESSAGE' on stderr as one line written at once. print() writes the text and
    its newline apart, and a warning that torch's C++ side writes to the same stream in between (a
    store's "sendBytes failed", from another thread) would land on the error's line."""
    sys.stderr.write(f"fastrsb: error: {message}\n")
    sys.stderr.flush()
