"""User-facing errors: the CLI prints them as one line and exits non-zero (traceback with --debug)."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, path), not a bug."""


def positive_int(text: str) -> int:
    """argparse type of a count that must be >= 1 (a batch size, repeats, processes)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
