"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class MolfError(ValueError):
    """A problem with the user's input (config, data, model, paths), not a bug in molf."""
