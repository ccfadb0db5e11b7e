"""User-facing errors: the CLI prints their message alone, without a traceback."""


class FFNError(Exception):
    """A problem with the user's input (config, split file, image, checkpoint)."""
