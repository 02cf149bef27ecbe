"""User-facing errors: one clear message that names the thing and how to fix it."""


class KdpromptError(Exception):
    """An error caused by the user's input (file, recipe field, data); the CLI prints it without a traceback."""
