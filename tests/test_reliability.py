"""Faults and interruptions: kill/resume, signals, corrupted checkpoints, non-finite gradients,
bad input refused before compute, and the safety rules."""

import ast
import errno
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from molf.cli import main
from molf.errors import MolfError
from molf.train import checkpoint as ckpt
from molf.train.manifest import MANIFEST
from tests.runs import SRC, start_training, tiny_run, train

RUN = tiny_run(
    "molf",
    n_train=16,
    n_val=0,
    n_test=2,
    max_steps=8,
    batch_size=2,
    grad_accum=2,
    lora_rank=4,
    lr_fft="1e-3",
    lr_lora="1e-3",
    lora_dropout=0.1,
)


def _finished(proc) -> None:
    assert proc.returncode == 0, proc.stderr


def _wait_for(pred, proc, timeout=240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    _finished(train(RUN, out))
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert (a / "routing.jsonl").read_text() == (b / "routing.jsonl").read_text()
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_sigkill_then_resume_auto_is_bitwise(tmp_path, straight_run):
    kill_after = random.Random(os.getpid()).randint(2, 6)
    out = tmp_path / "run"
    proc = start_training(RUN, out, "save_every=1", "keep_checkpoints=2")
    target = ckpt.checkpoint_dir(out, kill_after)
    assert _wait_for(lambda: (target / MANIFEST).exists(), proc), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    done = train(RUN, out, "save_every=1", "--resume", "auto")
    _finished(done)
    assert re.search(r"resumed from .*step-\d+ at step \d+", done.stderr)
    _assert_same_run(out, straight_run)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_checkpoint_and_exits(tmp_path, straight_run, sig, code):
    out = tmp_path / "run"
    proc = start_training(RUN, out, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    assert ckpt.latest_good_checkpoint(out) is not None
    assert "run the same command with --resume auto to continue" in err
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert f"molf: {name}: stopping after this step; a checkpoint follows" in err
    assert not (out / "summary.json").exists()
    done = train(RUN, out, "--resume", "auto")
    _finished(done)
    _assert_same_run(out, straight_run)


def test_a_second_ctrl_c_stops_at_once_and_says_what_it_gives_up(tmp_path, capsys):
    from molf.train.loop import _SignalFlag

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-0000004").mkdir(parents=True)
    flag = _SignalFlag(announce=True, run_dir=run_dir)
    flag._handle(signal.SIGINT, None)
    assert flag.signum == signal.SIGINT
    first = capsys.readouterr().err
    assert "molf: Ctrl-C: stopping after this step; a checkpoint follows" in first
    assert "Ctrl-C again stops at once, without it" in first
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)
    second = capsys.readouterr().err
    assert "second Ctrl-C: stopping now, without a checkpoint of this step" in second
    assert "--resume auto continues from" in second and "step-0000004" in second
    quiet = _SignalFlag(announce=False, run_dir=run_dir)  # ranks other than 0 say nothing
    quiet._handle(signal.SIGTERM, None)
    assert capsys.readouterr().err == ""


def test_timed_checkpoints_bound_what_a_kill_loses(tmp_path, straight_run):
    """Checkpoints by training time (no save_every): kill -9 after the first one, and
    `--resume auto` loses at most one interval (here shorter than a step: one step)."""
    out = tmp_path / "run"
    proc = start_training(RUN, out, "save_every_minutes=0.00001", "keep_checkpoints=2")
    metrics = out / "metrics.jsonl"
    kill_after = random.Random(os.getpid()).randint(2, 5)
    target = ckpt.checkpoint_dir(out, kill_after)
    assert _wait_for(lambda: (target / MANIFEST).exists(), proc), "no timed checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = metrics.read_text().count("\n")
    done = train(RUN, out, "save_every_minutes=0.00001", "--resume", "auto")
    _finished(done)
    resumed = int(re.search(r"resumed from .*step-\d+ at step (\d+)", done.stderr).group(1))
    assert steps_done - 1 <= resumed <= steps_done
    _assert_same_run(out, straight_run)


def test_timed_checkpoints_are_on_by_default():
    from molf.train.config import load_config

    cfg = load_config(None, [])
    assert cfg.save_every_minutes == 15 and cfg.keep_checkpoints == 2 and cfg.save_every == 0
    with pytest.raises(MolfError, match="config key 'save_every_minutes'"):
        load_config(None, ["save_every_minutes=-1"])


def test_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path, straight_run):
    out = tmp_path / "run"
    proc = start_training(RUN, out, "save_every=1", "keep_checkpoints=3")
    assert _wait_for(lambda: (ckpt.checkpoint_dir(out, 4) / MANIFEST).exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = ckpt.list_checkpoints(out)[-1]
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert ckpt.verify(newest) is not None
    with pytest.warns(UserWarning, match="checksum mismatch"):
        good = ckpt.latest_good_checkpoint(out)
    assert good == ckpt.list_checkpoints(out)[-2]
    done = train(RUN, out, "--resume", "auto")
    _finished(done)
    assert "skipping checkpoint" in done.stderr
    _assert_same_run(out, straight_run)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    def fill(tmp):
        (tmp / "a.bin").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        ckpt.signed_directory(tmp_path / "step-0000001", fill)
    assert list(tmp_path.iterdir()) == []


# -- in-process: non-finite gradients, disk space -------------------------------------------------
def _setup(tmp_path, *extra):
    from molf.train.config import load_config
    from molf.train.prepare import prepare

    overrides = [x for x in RUN if "=" in x] + list(extra)
    cfg = load_config(
        None,
        overrides,
        model="tiny-llama",
        method="molf",
        task="fact-geo",
        output_dir=str(tmp_path / "run"),
    )
    cfg.run_dir.mkdir(parents=True)
    return prepare(cfg, resume="auto")


def test_non_finite_step_is_skipped_and_leaves_everything_untouched(tmp_path):
    from molf.train.loop import train_loop
    from molf.train.progress import MetricLogger

    s = _setup(tmp_path, "max_steps=3")
    logger = MetricLogger(s.cfg, None)
    train_loop_steps = []
    first = next(p for p in s.model.parameters() if p.requires_grad)

    def poison(grad):
        if len(train_loop_steps) == 1:  # the second optimizer step
            return grad * float("nan")
        return grad

    first.register_hook(poison)
    orig_step = s.optimizer.step

    def counting_step(*a, **k):
        train_loop_steps.append(1)
        return orig_step(*a, **k)

    s.optimizer.step = counting_step
    s.total_steps = 1
    train_loop(s, 0, logger)
    weights = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in s.optimizer.state.items()}
    lr = s.optimizer.param_groups[0]["lr"]
    s.total_steps = 2
    stats = train_loop(s, 1, logger)
    assert stats["skipped_steps"] == 1
    for n, p in s.model.named_parameters():
        assert torch.equal(p, weights[n]), n
    for p, st in s.optimizer.state.items():
        for k, v in st.items():
            assert torch.equal(v, state[id(p)][k]), k
    assert s.optimizer.param_groups[0]["lr"] == lr  # the schedule did not move either
    assert (
        json.loads((s.cfg.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["skipped"]
        is True
    )


def test_consecutive_non_finite_steps_stop_with_a_checkpoint(tmp_path):
    from molf.train.loop import train_loop
    from molf.train.progress import MetricLogger

    s = _setup(tmp_path, "max_steps=6", "max_bad_steps=2")
    first = next(p for p in s.model.parameters() if p.requires_grad)
    first.register_hook(lambda g: g * float("inf"))
    with pytest.raises(MolfError, match="2 consecutive steps with non-finite gradients"):
        train_loop(s, 0, MetricLogger(s.cfg, None))
    good = ckpt.latest_good_checkpoint(s.cfg.run_dir)
    assert good is not None
    assert json.loads((good / "progress.json").read_text())["step"] == 1


def test_no_space_is_refused_before_compute(tmp_path, capsys, monkeypatch):
    import shutil

    from molf.train import prepare as prepare_mod

    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    called = []
    monkeypatch.setattr(prepare_mod, "apply_method", lambda *a, **k: called.append(1))
    code = main(["train", *RUN, "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not called
    assert not (tmp_path / "run" / "summary.json").exists()


def test_disk_full_while_checkpointing_is_one_clear_error(tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    code = main(["train", *RUN, "save_every=2", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("molf: error")]
    # one error line, the last thing printed (before it only the run's data note)
    assert code == 2 and len(errors) == 1 and err[-1] == errors[0]
    assert "could not write checkpoint at step 2" in err[-1] and "No space left" in err[-1]
    assert ckpt.list_checkpoints(tmp_path / "run") == []
    assert not (tmp_path / "run" / "summary.json").exists()


def test_too_long_examples_truncated_with_a_count_or_refused(tmp_path, capsys):
    code = main(
        ["train", *RUN, "max_length=6", "too_long=refuse", "--output-dir", str(tmp_path / "a")]
    )
    assert code == 2
    assert re.search(r"training example \d+: \d+ tokens > max_length 6", capsys.readouterr().err)
    code = main(["train", *RUN, "max_length=6", "max_steps=1", "--output-dir", str(tmp_path / "b")])
    assert code == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["truncated_examples"] > 0


@pytest.mark.parametrize("method", ["molf", "lora"])
def test_no_matching_target_modules(tmp_path, capsys, method):
    code = main(
        [
            "train",
            *RUN,
            "--method",
            method,
            "target_modules=[nope_proj]",
            "--output-dir",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "target_modules" in capsys.readouterr().err


def _unsafe_loads(tree: ast.AST) -> list[int]:
    """Lines of `torch.load(...)` / `load(...)` calls (however the name was imported) without
    `weights_only=True`, and of any `pickle.load(s)` call."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        if owner == "pickle" and name in ("load", "loads"):
            found.append(node.lineno)
        elif name == "load" and owner in ("torch", ""):
            safe = any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                found.append(node.lineno)
    return found


def test_the_unsafe_load_check_sees_every_spelling():
    bad = "import torch\nfrom torch import load\ntorch.load(p)\nload(p, weights_only=False)\n"
    bad += "torch.load(p, map_location='cpu',\n           weights_only=None)\nimport pickle\npickle.loads(b)\n"
    assert _unsafe_loads(ast.parse(bad)) == [3, 4, 5, 8]
    good = "torch.load(p, weights_only=True)\ntorch.load(\n    p, map_location='cpu', weights_only=True\n)\n"
    assert _unsafe_loads(ast.parse(good)) == []


def test_safety_rules_hold_in_the_source():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert _unsafe_loads(ast.parse(text)) == [], path
        assert "trust_remote_code=True" not in text, path
    from molf.train.config import TrainConfig

    assert TrainConfig().trust_remote_code is False
