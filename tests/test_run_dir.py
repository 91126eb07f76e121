"""No command path deletes a file molf did not write (issue #21, item 1).

`--overwrite` used to remove the output directory before the data and model were checked, and a
directory of the user's own files was called "an unfinished run" with advice to overwrite it."""

import json

import pytest

from molf.cli import main
from molf.errors import MolfError
from molf.train.run_dir import MARKER, check_output_dir, clear_run_dir, is_run_dir
from tests.runs import tiny_run

TINY = dict(n_train=4, n_val=0, n_test=2, max_steps=1, batch_size=2, lora_rank=4, max_length=64)


def _train(out, *extra, method="lora", task="fact-geo", **settings):
    return main(
        ["train", *tiny_run(method, task, **(TINY | settings)), "--output-dir", str(out), *extra]
    )


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def _user_files(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mydata.jsonl").write_text('{"text": "hello"}\n')
    (directory / "notes.txt").write_text("my notes\n")
    return {p.name: p.read_text() for p in directory.iterdir()}


def _still_there(directory, files):
    assert {n: (directory / n).read_text() for n in files} == files


def test_a_finished_run_survives_an_overwrite_whose_data_is_missing(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    summary = (out / "summary.json").read_text()
    capsys.readouterr()
    code = main(
        ["train", *tiny_run("lora", "sft", **TINY), "--data", str(tmp_path / "missing.jsonl")]
        + ["--output-dir", str(out), "--overwrite"]
    )
    assert code == 2
    assert "missing.jsonl" in _error_line(capsys)
    assert (out / "summary.json").read_text() == summary
    assert (out / "final" / "model").is_dir()


def test_a_finished_run_survives_an_overwrite_with_a_bad_model_or_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    capsys.readouterr()
    argv = ["train", "--method", "lora", "--task", "fact-geo", "--model", str(tmp_path / "nope")]
    assert main([*argv, "--output-dir", str(out), "--overwrite", "progress=false"]) == 2
    assert (out / "summary.json").exists()
    # a bad config value, likewise
    assert _train(out, "--overwrite", lora_alpha=0) == 2
    assert "config key 'lora_alpha'" in _error_line(capsys)
    assert (out / "summary.json").exists() and (out / "final" / "model").is_dir()


def test_a_directory_of_user_files_is_refused_without_advice_to_delete_it(tmp_path, capsys):
    out = tmp_path / "mine"
    files = _user_files(out)
    assert _train(out) == 2
    line = _error_line(capsys)
    assert "not a molf run directory" in line and "mydata.jsonl" in line
    assert "--overwrite" not in line and "--resume" not in line
    _still_there(out, files)
    # neither flag makes it a run
    assert _train(out, "--overwrite") == 2
    _still_there(out, files)
    assert _train(out, "--resume", "auto") == 2
    _still_there(out, files)
    assert not (out / MARKER).exists() and not (out / "config.yaml").exists()


def test_the_data_file_inside_the_output_directory_survives(tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    data = out / "train.jsonl"
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", *tiny_run("lora", "sft", **TINY), "--data", str(data)]
    assert main([*argv, "--output-dir", str(out), "--overwrite"]) == 2
    assert data.exists()
    assert "not a molf run directory" in _error_line(capsys)


def test_overwrite_removes_only_what_molf_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    files = {"notes.txt": "kept\n"}
    (out / "notes.txt").write_text(files["notes.txt"])
    capsys.readouterr()
    assert _train(out, "--overwrite") == 0
    _still_there(out, files)
    assert "kept files molf did not write: notes.txt" in capsys.readouterr().err
    assert (out / "summary.json").exists() and (out / MARKER).exists()


def test_a_run_directory_carries_the_marker_and_an_unfinished_one_is_named_so(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "config.yaml").write_text("method: lora\n")
    assert is_run_dir(out)
    assert _train(out) == 2
    assert "unfinished run" in _error_line(capsys)


def test_runs_from_before_the_marker_are_still_runs(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("method: lora\n")
    assert not is_run_dir(old)  # a lone config.yaml may be the user's
    (old / "metrics.jsonl").write_text("")
    assert is_run_dir(old)
    check_output_dir(old, "auto", False)


def test_clear_run_dir_refuses_a_foreign_directory(tmp_path):
    mine = tmp_path / "mine"
    files = _user_files(mine)
    with pytest.raises(MolfError, match="not a molf run directory"):
        clear_run_dir(mine)
    _still_there(mine, files)


def test_compare_refuses_a_directory_of_user_files(tmp_path, capsys):
    out = tmp_path / "mine"
    files = _user_files(out)
    argv = ["compare", "--budget", "smoke", "--tasks", "fact-geo", "--methods", "lora"]
    assert main([*argv, "--output-dir", str(out), "--lr-grid", "off"]) == 2
    assert "not a molf compare directory" in _error_line(capsys)
    _still_there(out, files)


def test_peft_export_does_not_replace_a_directory_of_user_files(tmp_path):
    import torch

    import molf

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model = molf.wrap(model, molf.MoLFConfig(lora_ranks=(2, 4), train_base=False))
    out = tmp_path / "adapter"
    files = _user_files(out)
    with pytest.raises(MolfError, match="not a PEFT adapter's"):
        molf.export_peft_lora(model, out)
    _still_there(out, files)
    fresh = tmp_path / "fresh"
    molf.export_peft_lora(model, fresh)
    molf.export_peft_lora(model, fresh)  # an earlier export may be replaced
    assert (fresh / "adapter_config.json").exists()
