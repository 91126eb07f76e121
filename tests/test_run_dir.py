"""No command path deletes or rewrites a file molf did not write.

A run directory is molf's only if it carries the marker; `--overwrite`, checkpoint pruning and
the end of a run remove exactly the files the run recorded in its ledger."""

import json
from pathlib import Path

import pytest

from molf.cli import main
from molf.errors import MolfError
from molf.train.run_dir import MARKER, clear_run_dir, is_run_dir
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


def _snapshot(directory):
    """Every file under `directory` with its bytes and every directory, for byte-identity."""
    return {
        p.relative_to(directory).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(directory.rglob("*"))
    }


def _other_tools_run(directory):
    """What another trainer leaves behind: its config, metrics and checkpoints, and notes."""
    (directory / "checkpoints" / "checkpoint-500").mkdir(parents=True)
    (directory / "checkpoints" / "checkpoint-500" / "model.safetensors").write_bytes(b"\0" * 64)
    (directory / "config.yaml").write_text("method: lora\nlr: 1e-4\n")
    (directory / "metrics.jsonl").write_text('{"step": 500, "loss": 1.5}\n')
    (directory / "notes.txt").write_text("their notes\n")
    return _snapshot(directory)


def test_another_tool_s_run_folder_is_not_a_run_and_stays_byte_identical(tmp_path, capsys):
    out = tmp_path / "theirs"
    before = _other_tools_run(out)
    assert not is_run_dir(out)
    for flags in ([], ["--overwrite"], ["--resume", "auto"], ["--overwrite", "--resume", "auto"]):
        assert _train(out, *flags) == 2
        line = _error_line(capsys)
        assert "not a molf run directory" in line and "--overwrite" not in line
        assert _snapshot(out) == before
    with pytest.raises(MolfError, match="not a molf run directory"):
        clear_run_dir(out)
    assert _snapshot(out) == before


def test_a_user_file_inside_final_or_checkpoints_survives_overwrite_and_run_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    (out / "final" / "notes.txt").write_text("mine\n")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "keep.txt").write_text("also mine\n")
    capsys.readouterr()
    # a checkpoint every step: the run writes, prunes and finally removes its checkpoints
    assert _train(out, "--overwrite", max_steps=3, save_every=1, keep_checkpoints=1) == 0
    assert (out / "final" / "notes.txt").read_text() == "mine\n"
    assert (out / "checkpoints" / "keep.txt").read_text() == "also mine\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["keep.txt"]
    err = capsys.readouterr().err
    assert "checkpoints/keep.txt" in err and "final/notes.txt" in err
    assert (out / "final" / "model").is_dir() and (out / "summary.json").exists()


def test_overwrite_refuses_a_run_whose_replaced_folder_holds_a_user_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    (out / "final" / "model" / "README.md").write_text("my model card\n")
    before = _snapshot(out)
    capsys.readouterr()
    assert _train(out, "--overwrite") == 2
    line = _error_line(capsys)
    assert "final/model/README.md" in line and "nothing removed" in line
    assert _snapshot(out) == before
    with pytest.raises(MolfError, match="README.md"):
        clear_run_dir(out)
    assert _snapshot(out) == before


def test_a_mistyped_resume_value_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--resume", "auot") == 2
    line = _error_line(capsys)
    assert "--resume auot" in line and "'auto'" in line
    assert not out.exists()


def test_a_run_marked_by_an_older_molf_is_not_cleared_by_guesswork(tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    (old / MARKER).write_text('{"molf_version": "0.1.0"}\n')  # no ledger of its files
    (old / "config.yaml").write_text("method: lora\n")
    (old / "summary.json").write_text("{}")
    before = _snapshot(old)
    assert is_run_dir(old)
    assert _train(old, "--overwrite") == 2
    assert "without a record of its files" in _error_line(capsys)
    assert _snapshot(old) == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_have_the_modes_of_the_user_s_umask(tmp_path, umask):
    import os

    out = tmp_path / "run"
    old = os.umask(umask)
    try:
        assert _train(out, method="molf", max_steps=2, save_every=1, keep_checkpoints=0) == 0
    finally:
        os.umask(old)
    modes = {
        p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]
    }
    assert "final/model/model.safetensors" in modes
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    wrong = {
        rel: oct(mode)
        for rel, mode in modes.items()
        if mode != (want_dir if (out / rel).is_dir() else want_file)
    }
    assert not wrong


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


def _made_run(run):
    """A run directory as molf leaves it, without training: marker, ledger, recorded files."""
    from molf.train.run_dir import mark_run_dir, record

    mark_run_dir(run)
    (run / "final" / "model").mkdir(parents=True)
    (run / "final" / "model" / "model.safetensors").write_text("weights")
    (run / "config.yaml").write_text("method: lora\n")
    record(run, "config.yaml", run / "final")
    return run


def test_only_molf_s_own_temporary_names_count_as_its_leftovers(tmp_path):
    """Clearing a run removes the leftovers of molf's atomic writes (`.tmp-<name>-<random>`,
    `.tmp-<name>`, `.<name>.tmp`) written for a path molf recorded or a checkpoint, at the top and
    inside recorded folders, and keeps every other name, even one of those forms written for a
    name of the user's (`.notes.tmp`, a `.tmp-mine` folder): they are the user's."""
    from molf.train.run_dir import foreign_files, record

    run = _made_run(tmp_path / "run")
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "checkpoints" / "step-1" / "model.safetensors").write_text("weights")
    record(run, "checkpoints/step-1")
    dirs = [run / ".tmp-final-ab12cd34", run / "final" / ".tmp-model-zz99yy88"]
    dirs.append(run / "checkpoints" / ".tmp-step-5-abcdefgh")
    for p in dirs:
        p.mkdir()
        (p / "part.bin").write_text("half-written")
    files = [run / ".config.yaml.tmp", run / "..molf-files.tmp", run / ".tmp-config.yaml"]
    for p in files:
        p.write_text("half-written")
    mine = {".env": "KEY=1", "notes.tmp": "draft", ".tmpnotes": "x", "final/.cache": "c"}
    mine |= {".notes.tmp": "mine", ".tmp-mine/a.txt": "mine", "checkpoints/.tmp-x": "mine"}
    (run / ".tmp-mine").mkdir()
    for rel, text in mine.items():
        (run / rel).write_text(text)
    assert foreign_files(run) == sorted(mine)
    assert clear_run_dir(run) == sorted(mine)
    assert not any(p.exists() for p in dirs + files)
    assert {rel: (run / rel).read_text() for rel in mine} == mine
    assert not (run / "config.yaml").exists() and not (run / "final" / "model").exists()


def test_overwrite_is_blocked_only_by_a_user_file_inside_a_folder_it_replaces(tmp_path):
    """A user's file deep in a folder of their own, or a leftover of molf's inside `final/`, does
    not block `--overwrite`; user files inside `final/model` do, and the refusal names the first
    and counts the rest."""
    from molf.train.run_dir import check_output_dir

    run = _made_run(tmp_path / "run")
    (run / "mine" / "deep").mkdir(parents=True)
    (run / "mine" / "deep" / "keep.txt").write_text("mine")
    (run / "final" / "model" / ".model.safetensors.tmp").write_text("half")
    check_output_dir(run, "none", overwrite=True)
    (run / "final" / "model" / "a.txt").write_text("mine")
    with pytest.raises(MolfError, match=r"final/model/a\.txt: move it out of the run first"):
        check_output_dir(run, "none", overwrite=True)
    (run / "final" / "model" / "b.txt").write_text("mine")
    with pytest.raises(MolfError, match=r"a\.txt \(and 1 more\): move it out"):
        check_output_dir(run, "none", overwrite=True)


def test_refusals_name_what_they_found_and_what_to_do(tmp_path):
    """A non-run directory's refusal lists three of its names and counts the rest; a run marked
    by a molf without a ledger (or a marker molf cannot read) is refused with the way out, and
    one holding nothing but its marker may be reused."""
    from molf.train.run_dir import check_output_dir

    user = tmp_path / "user"
    user.mkdir()
    for name in "abcde":
        (user / f"{name}.txt").write_text(name)
    with pytest.raises(MolfError, match=r"holds a\.txt, b\.txt, c\.txt and 2 more\)"):
        check_output_dir(user, "none", overwrite=True)
    (user / "d.txt").unlink()
    (user / "e.txt").unlink()
    with pytest.raises(MolfError, match=r"holds a\.txt, b\.txt, c\.txt\)"):  # no "and 0 more"
        check_output_dir(user, "none", overwrite=True)
    for marker in ('{"molf_version": "0.1.0"}\n', "not json\n"):
        old = tmp_path / f"old{len(marker)}"
        old.mkdir()
        (old / MARKER).write_text(marker)
        check_output_dir(old, "none", overwrite=True)  # nothing but the marker: nothing to lose
        (old / "config.yaml").write_text("method: lora\n")
        with pytest.raises(
            MolfError, match=r"remove the directory yourself or give another --output-dir$"
        ):
            check_output_dir(old, "none", overwrite=True)


def test_the_ledger_records_every_folder_molf_made_and_forgets_what_it_removed(
    tmp_path, monkeypatch
):
    """record() lists a file's parent folders (ending in '/') and a folder's whole tree, for a
    path given relative to the run or with the run's own prefix, and refuses one outside it;
    remove_recorded() empties nested folders deepest first, skips a recorded folder the user
    already deleted, and drops the removed entries from the ledger."""
    from molf.train.run_dir import LEDGER, mark_run_dir, record, recorded, remove_recorded

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "a" / "b" / "run"
    mark_run_dir(run)  # makes its parents too
    marker = json.loads((run / MARKER).read_text())
    assert marker["ledger"] is True and isinstance(marker["molf_version"], str)
    deep = run / "checkpoints" / "step-2" / "opt"
    deep.mkdir(parents=True)
    (deep / "state.safetensors").write_text("x")
    (run / "checkpoints" / "step-2" / "model.safetensors").write_text("x")
    record(run, "checkpoints/step-2")
    record(Path("a/b/run"), Path("a/b/run/config.yaml"))  # the run's prefix, as given
    (run / "config.yaml").write_text("c")
    assert recorded(run) == {
        "checkpoints/",
        "checkpoints/step-2/",
        "checkpoints/step-2/opt/",
        "checkpoints/step-2/opt/state.safetensors",
        "checkpoints/step-2/model.safetensors",
        "config.yaml",
    }
    with pytest.raises(ValueError, match="is not inside the run directory"):
        record(run, tmp_path / "elsewhere.txt")
    (run / "checkpoints" / "step-3").mkdir()
    record(run, "checkpoints/step-3/")
    (run / "checkpoints" / "step-3").rmdir()  # the user removed it already
    remove_recorded(run, "checkpoints/step-3")  # while the ledger still lists it
    remove_recorded(run, "checkpoints/step-2/")
    assert not (run / "checkpoints" / "step-2").exists()
    assert recorded(run) == {"checkpoints/", "config.yaml"}
    assert sorted((run / LEDGER).read_text().splitlines()) == ["checkpoints/", "config.yaml"]


def test_each_output_directory_refusal_says_what_to_do(tmp_path):
    """The refusals of check_output_dir and of a bad --resume, word for word where they advise."""
    from molf.train.run_dir import SUMMARY, check_output_dir, check_resume_value

    with pytest.raises(MolfError, match=r"--resume .*nowhere: expected .*\(no such directory\)"):
        check_resume_value(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MolfError, match=r"empty: expected 'auto', 'none' or a checkpoint"):
        check_resume_value(str(tmp_path / "empty"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MolfError, match=r"^output directory .*afile is not a directory$"):
        check_output_dir(tmp_path / "afile", "none", overwrite=False)
    run = _made_run(tmp_path / "run")
    with pytest.raises(MolfError, match=r"unfinished run \(use --resume auto to continue it, or "):
        check_output_dir(run, "none", overwrite=False)
    (run / SUMMARY).write_text("{}")
    finished = r"finished run \(use --overwrite to replace it; only files molf wrote are removed\)"
    with pytest.raises(MolfError, match=finished):
        check_output_dir(run, "auto", overwrite=False)
    user = tmp_path / "user"
    user.mkdir()
    (user / "a.txt").write_text("a")
    with pytest.raises(MolfError, match=r"\(it holds a\.txt\); .* give another --output-dir$"):
        check_output_dir(user, "none", overwrite=False)


def test_removing_a_leftover_is_best_effort(tmp_path, monkeypatch):
    """A temporary of molf's that cannot be removed (or is already gone) does not stop clearing
    the run; what could not be removed is named among the files kept, not deleted later."""
    import os

    from molf.train.run_dir import _remove_path, clear_run_dir

    _remove_path(tmp_path / "gone")  # removed meanwhile: no error
    run = _made_run(tmp_path / "run")
    stuck = run / ".tmp-final-0123abcd"
    stuck.mkdir()
    (stuck / "half.safetensors").write_text("half")
    real_unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if str(path).endswith("half.safetensors"):
            raise PermissionError(path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)
    assert clear_run_dir(run) == [".tmp-final-0123abcd/half.safetensors"]
    assert not (run / "final").exists() and (stuck / "half.safetensors").exists()


def test_a_complete_checkpoint_is_a_resume_value_and_a_broken_one_is_named(tmp_path):
    """`--resume PATH` takes a checkpoint whose manifest verifies, and names what is wrong with
    one that does not (a missing directory, a changed file)."""
    from molf.train.manifest import write_manifest
    from molf.train.run_dir import check_resume_value

    ckpt = tmp_path / "step-4"
    ckpt.mkdir()
    (ckpt / "state.safetensors").write_text("weights")
    write_manifest(ckpt)
    check_resume_value(str(ckpt))
    with pytest.raises(MolfError, match=r"checkpoint directory \(no such directory\)$"):
        check_resume_value(str(tmp_path / "step-5"))
    (ckpt / "state.safetensors").write_text("changed")
    with pytest.raises(MolfError, match=r"--resume .*step-4: expected 'auto', 'none' or a"):
        check_resume_value(str(ckpt))


def test_names_that_only_contain_a_recorded_name_are_the_user_s(tmp_path):
    """A temporary's form is exact: `.tmp-<name>`, `.tmp-<name>-<random>`, `.<name>.tmp` with a
    non-empty <name>. A file of the user's that merely contains a recorded name, or is a bare
    `.tmp-`, stays; leftovers written for a one-letter recorded name go; removing a checkpoint
    removes the leftovers inside it."""
    from molf.train.run_dir import clear_run_dir, record, remove_recorded

    run = _made_run(tmp_path / "run")
    (run / "a").write_text("one letter")
    record(run, "a")
    theirs = ["12345config.yaml", "xconfig.yamlabcd", ".config.yaml.bak", "final/.tmp-"]
    theirs += ["final/..tmp", ".tmp-finalX"]
    for name in theirs:
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("mine")
    for leftover in (".tmp-a", ".a.tmp"):
        (run / leftover).write_text("half")
    assert sorted(clear_run_dir(run)) == sorted(theirs)
    assert not (run / ".tmp-a").exists() and not (run / ".a.tmp").exists()
    ckpt = run / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_text("weights")
    record(run, "checkpoints/step-2")
    (ckpt / ".model.safetensors.tmp").write_text("half")
    remove_recorded(run, "checkpoints/step-2")
    assert not ckpt.exists()
