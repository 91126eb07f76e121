"""A new user's first runs say what they do: few optimizer steps are named before training and
the defaults on a small own file give enough of them; `molf eval` says which rows it scores; a
mistyped model path, task or model name is named (with the closest name); long evaluation and
prediction phases show progress; the one known bitsandbytes notice is dropped for library users."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from molf.cli import main
from tests.runs import child_env

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "data" / "capitals_chat.jsonl"
QUIET = ["progress=false", "eval_before=false", "max_length=64"]


def _rows(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"rows{n}.jsonl"
    path.write_text("".join(CHAT.read_text().splitlines(keepends=True)[:n]))
    return path


def _train(data: Path, out: Path, *settings: str) -> int:
    argv = ["train", "molf", "--model", "tiny-llama", "--task", "sft", "--data", str(data)]
    return main([*argv, "--output-dir", str(out), *QUIET, *settings])


def test_a_small_own_file_gets_enough_steps_by_default_and_says_how(tmp_path, capsys):
    data = _rows(tmp_path, 60)
    assert _train(data, tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert (
        "data: 48 training rows: grad_accum 1 (default 4) and epochs 4 (default 2) give 24 "
        "optimizer steps of 8 rows; set grad_accum, epochs or max_steps to choose"
    ) in err
    assert "too few to learn much" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 24
    assert summary["config"]["grad_accum"] == 1 and summary["config"]["epochs"] == 4


def test_few_steps_the_user_chose_are_named_before_training(tmp_path, capsys):
    data = _rows(tmp_path, 60)
    assert _train(data, tmp_path / "run", "grad_accum=4") == 0
    err = capsys.readouterr().err
    assert (
        "molf: this run takes only 3 optimizer steps (48 training rows, batch_size 8 x "
        "grad_accum 4 = 32 rows a step, epochs 2): too few to learn much. Lower grad_accum or "
        "batch_size, raise epochs, add rows, or set max_steps"
    ) in err
    assert "data: 48 training rows: grad_accum" not in err  # the user chose: nothing adapted
    # max_steps is a choice too: no note
    assert _train(data, tmp_path / "run2", "max_steps=2") == 0
    assert "too few to learn much" not in capsys.readouterr().err


def test_eval_says_which_rows_it_scores(tmp_path, capsys):
    data = _rows(tmp_path, 40)
    base = ["eval", "--task", "sft", "--data", str(data)]
    assert main([*base, "--model", "tiny-llama"]) == 0
    assert "sft on tiny-llama (all 40 rows are test records)" in capsys.readouterr().out
    out = tmp_path / "run"
    assert _train(data, out, "max_steps=1") == 0
    capsys.readouterr()
    model = str(out / "final" / "model")
    # the run's own file, named another way, is still the run's: its held-out rows only
    other_name = str(Path(str(data)).parent / "." / data.name)
    assert main(["eval", "--task", "sft", "--model", model, "--data", other_name]) == 0
    assert "(4 held-out test records of the run)" in capsys.readouterr().out


def _error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_missing_model_path_and_mistyped_names_are_named(tmp_path, capsys):
    data = _rows(tmp_path, 12)
    missing = str(tmp_path / "runs" / "finall" / "model")
    assert main(["eval", "--task", "sft", "--data", str(data), "--model", missing]) == 2
    assert _error(capsys) == f"molf: error: --model {missing}: no such file or directory"
    assert main(["eval", "--task", "fact-goe", "--model", "tiny-llama"]) == 2
    assert "did you mean 'fact-geo'?" in _error(capsys)
    argv = ["train", "molf", "--task", "fact-geo", "--model", "smollm-135m", *QUIET]
    assert main([*argv, "--output-dir", str(tmp_path / "x")]) == 2
    assert "model 'smollm-135m' (did you mean 'smollm2-135m'?)" in _error(capsys)


def test_evaluation_shows_progress_unless_told_not_to(tmp_path, capsys):
    data = _rows(tmp_path, 24)
    argv = ["train", "lora", "--model", "tiny-llama", "--task", "sft", "--data", str(data)]
    assert main([*argv, "--output-dir", str(tmp_path / "run"), "max_steps=1", "max_length=64"]) == 0
    err = capsys.readouterr().err
    assert "eval before" in err and "eval test" in err and "batch" in err
    assert main(["eval", "--task", "sft", "--data", str(data), "--model", "tiny-llama"]) == 0
    assert "eval:" in capsys.readouterr().err
    assert main([*argv, "--output-dir", str(tmp_path / "q"), *QUIET, "max_steps=1"]) == 0
    assert "eval test" not in capsys.readouterr().err


def test_the_bitsandbytes_notice_is_dropped_for_library_users():
    notice = (
        "Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository 'x' "
        "could not verify publisher trust status."
    )
    code = (
        "import logging, molf\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        f"log.warning({notice!r})\n"
        "log.warning('another bitsandbytes line')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "could not verify publisher trust status" not in done.stderr
    assert "another bitsandbytes line" in done.stderr
