"""MOLF_TEST_REQUIRE_ALL=1 (set by .ci/run) turns a skip for want of the native kernels, the
packaged assets or bitsandbytes into a failure, so CI cannot pass without testing them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.runs import child_env

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
from tests.conftest import needs, skip_unless


def test_something_missing():
    skip_unless(False, "the thing")


@needs(False, "the other thing")
def test_marked_as_needing_something_missing():
    raise RuntimeError("the other thing is missing")
"""


def _pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    probe = ROOT / "tests" / f"_probe_require_{tmp_path.name}.py"
    probe.write_text(PROBE)
    try:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            str(probe),
        ]
        return subprocess.run(
            cmd, cwd=ROOT, env=child_env() | env, capture_output=True, text=True, timeout=300
        )
    finally:
        probe.unlink()


def test_missing_pieces_skip_by_default_and_fail_when_required(tmp_path):
    relaxed = _pytest(tmp_path, MOLF_TEST_REQUIRE_ALL="0")
    assert relaxed.returncode == 0 and "2 skipped" in relaxed.stdout, relaxed.stdout
    strict = _pytest(tmp_path, MOLF_TEST_REQUIRE_ALL="1")
    assert strict.returncode == 1 and "2 failed" in strict.stdout, strict.stdout
    assert "the thing is missing and MOLF_TEST_REQUIRE_ALL=1 requires it" in strict.stdout


def test_ci_requires_them():
    assert "MOLF_TEST_REQUIRE_ALL=1 make test" in (ROOT / ".ci" / "run").read_text()
