"""The front door: a README that is a front page, a docs site that builds and renders every public
name, no project history in user docs, a license, and each setting defined once."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import molf
from tests.runs import child_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# how each result directory was produced stays in that directory's own notes
RESULT_NOTES = {"docs/results/README.md", "docs/results-fact-geo-6seeds/README.md"}
RESULT_NOTES |= {"docs/routing-sweep/README.md", "docs/results-rank8/README.md"}
RESULT_NOTES |= {"docs/results-planted/README.md", "docs/routing-sweep-pfn/README.md"}
RESULT_NOTES |= {"docs/results-rank8-alpha8/README.md", "docs/results-ablations/README.md"}
RESULT_NOTES |= {"docs/results-rank8-med/README.md", "docs/results-scarce32/README.md"}
RESULT_NOTES |= {"docs/results-rank8-sql/README.md", "docs/results-volume608/README.md"}


def _user_pages() -> list[Path]:
    pages = [ROOT / "README.md", *DOCS.rglob("*.md")]
    return [p for p in pages if p.relative_to(ROOT).as_posix() not in RESULT_NOTES]


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for heading in ("## Should I use MoLF?", "## Install", "## Quickstart", "## Citation"):
        assert heading in text
    assert "## License" in text and "Apache-2.0" in text
    # its links point at files that exist
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_user_docs_carry_no_project_history():
    for page in _user_pages():
        text = page.read_text()
        where = page.relative_to(ROOT)
        assert not re.search(r"issue #\d+|\(was \d", text, re.IGNORECASE), where
        assert "worktree" not in text and "lent to us" not in text, where
        assert "load average" not in text, where


def test_the_api_page_renders_every_public_name():
    api = (DOCS / "reference" / "api.md").read_text()
    for name in molf.__all__:
        assert f"::: molf.{name}\n" in api, name


def test_the_config_key_table_and_the_cli_help_come_from_the_code():
    sys.path.insert(0, str(DOCS))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS))
    from molf.train.settings import describe_keys

    page = hooks.on_page_markdown("<!-- molf:config-keys -->", None, None, None)
    for name, _, default, text in describe_keys():
        assert f"| `{name}` |" in page and f"`{default}`" in page and text
    assert "| `lora_alpha` | `float` | `32` |" in page
    cli = hooks.on_page_markdown("<!-- molf:cli-help -->", None, None, None)
    assert "### `molf train`" in cli and "--keys" in cli and "### `molf routing-sweep`" in cli


def test_the_license_is_in_the_repository_and_the_wheel(tmp_path):
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("molf-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


_ALPHA_PROBE = """
import molf
from molf.experiments.sweep import sweep_points
from molf.train.config import load_config
print("default", load_config(None).lora_alpha)
print("bundled", load_config("molf").lora_alpha, load_config("lora").lora_alpha)
print("yaml", load_config("mine.yaml").lora_alpha)
print("core", molf.MoLFConfig(lora_ranks=(8, 32)).lora_alphas)
point = next(p for p in sweep_points((8.0,), (1.0,)) if p.variant == "molf-e-equal-alpha")
print("sweep", point.values["lora_alpha"])
"""


def test_the_default_lora_alpha_is_set_in_one_place(tmp_path):
    """Change DEFAULT_LORA_ALPHA in a copy of the sources: the config default, every bundled
    config, a user's YAML without the key, the core's MoLFConfig, the sweep and `molf train
    --print-config` all follow it."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "src" / "molf", src / "molf", ignore=shutil.ignore_patterns("__pycache__")
    )
    config = src / "molf" / "config.py"
    text = config.read_text()
    assert text.count("DEFAULT_LORA_ALPHA = 32.0") == 1
    config.write_text(text.replace("DEFAULT_LORA_ALPHA = 32.0", "DEFAULT_LORA_ALPHA = 7.0"))
    (tmp_path / "mine.yaml").write_text("method: lora\nlr_lora: 1.0e-4\n")
    env = child_env() | {"PYTHONPATH": str(src)}
    run = [sys.executable, "-c", _ALPHA_PROBE]
    done = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:5] == [
        "default 7.0",
        "bundled 7.0 7.0",
        "yaml 7.0",
        "core (7.0, 7.0)",
        "sweep 7.0",
    ]
    cli = [sys.executable, "-m", "molf.cli", "train", "molf", "--print-config"]
    shown = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "lora_alpha: 7.0" in shown.stdout.splitlines()
