"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class MoLFError(ValueError):
    """A problem with the user's input (config, data, model, paths), not a bug in molf."""


# the name molf 0.1.0 exported; kept so that `except molf.MolfError` keeps working
MolfError = MoLFError


class MoLFWarning(UserWarning):
    """molf's own warnings (misuse, settings that defeat the method, silent fallbacks): filter
    them as a group with `warnings.filterwarnings("ignore", category=molf.MoLFWarning)`."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, to quote inside a MolfError (library messages often
    span several lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
