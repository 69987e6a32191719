"""User-facing errors: the CLI prints them as one line and exits non-zero (traceback with --debug)."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, path), not a bug."""
