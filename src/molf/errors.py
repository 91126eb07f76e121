"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class MolfError(ValueError):
    """A problem with the user's input (config, data, model, paths), not a bug in molf."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, to quote inside a MolfError (library messages often
    span several lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
