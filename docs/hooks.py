"""mkdocs hook: pages that are generated from the code at build time, so they cannot drift.

`<!-- molf:config-keys -->` becomes the table of every `molf train` config key (its type,
default and help, read from `molf.train.settings.TrainConfig`, where they are defined once);
`<!-- molf:cli-help -->` becomes the `--help` of every `molf` subcommand."""

from __future__ import annotations

import contextlib
import io
from typing import Any


def _config_keys() -> str:
    from molf.train.settings import describe_keys

    rows = ["| key | type | default | what it sets |", "| --- | --- | --- | --- |"]
    for name, kind, default, text in describe_keys():
        cells = [f"`{name}`", f"`{kind}`", f"`{default}`", text.replace("|", "\\|")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cli_help() -> str:
    from molf.cli import build_parser

    parser = build_parser()
    parts = []
    for command in ("train", "eval", "compare", "routing-sweep"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            parser.parse_args([command, "--help"])
        parts.append(f"### `molf {command}`\n\n```text\n{out.getvalue().rstrip()}\n```")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "<!-- molf:config-keys -->" in markdown:
        markdown = markdown.replace("<!-- molf:config-keys -->", _config_keys())
    if "<!-- molf:cli-help -->" in markdown:
        markdown = markdown.replace("<!-- molf:cli-help -->", _cli_help())
    return markdown
