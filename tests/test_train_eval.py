"""Evaluation during training (`eval_every`), best-checkpoint export (`keep_best`), early stopping,
resuming with both, and the bad paths of `molf train`, all through `molf.cli.main` on tiny-llama.

The validation metric is scripted (the sft task's `evaluate` replaced) so that which step is best
is known in advance; the weights the model had at each evaluation are recorded, so that the test
can check that final/ holds the best step's weights, not the last."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from molf.cli import main
from molf.tasks.sft import SftTask
from molf.train import checkpoint as ckpt
from tests.runs import tiny_run

FAST = {"batch_size": 2, "grad_accum": 1, "n_val": 3, "n_test": 3, "max_length": 32}


@pytest.fixture
def rows(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    with path.open("w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"{i} plus one is", "completion": f" {i + 1}"}) + "\n")
    return path


class Scripted:
    """Replaces SftTask.evaluate: during training, returns the next scripted loss and records the
    trainable weights the model had; afterwards (final test/validation scores) returns 0.5."""

    def __init__(self, values: list[float], run_dir: Path) -> None:
        self.values, self.run_dir = list(values), run_dir
        self.weights: list[dict[str, torch.Tensor]] = []
        self.checkpoints: list[list[str]] = []

    def as_method(self):
        return lambda task, *args, **kwargs: self(task, *args, **kwargs)

    def __call__(self, task, model, tokenizer, records, batch_size=16):
        if not self.values:  # the scores of the final model
            return {"loss": 0.5, "perplexity": 1.6}
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self.checkpoints.append([p.name for p in ckpt.list_checkpoints(self.run_dir)])
        v = self.values.pop(0)
        return {"loss": v, "perplexity": float(torch.tensor(v).exp())}


def _train(rows: Path, out: Path, *extra: str, **settings: object) -> int:
    args = tiny_run("fft", "sft", lr_fft=0.05, **(FAST | settings))
    return main(["train", *args, "--data", str(rows), "--output-dir", str(out), *extra])


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model" / "model.safetensors"))


def _same(saved: dict[str, torch.Tensor], at_eval: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, at_eval[n]) for n, t in saved.items() if n in at_eval)


def test_eval_records_and_keep_best_exports_the_best_step(rows, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    script = Scripted([3.0, 1.0, 2.0, 2.5], out)
    monkeypatch.setattr(SftTask, "evaluate", script.as_method())
    code = _train(
        rows, out, max_steps=8, eval_every=2, keep_best=True, save_every=1, keep_checkpoints=1
    )
    assert code == 0, capsys.readouterr().err
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert [r["eval"]["loss"] for r in evals] == [3.0, 1.0, 2.0, 2.5]
    assert set(evals[0]["eval"]) == {"loss", "perplexity"}
    # keep_checkpoints=1 never pruned the best one (step 4) while later ones were written
    assert "step-0000004" in script.checkpoints[2] and "step-0000004" in script.checkpoints[3]
    final = _final_weights(out)
    assert _same(final, script.weights[1])  # step 4's weights ...
    assert not _same(final, script.weights[3])  # ... not the last step's
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_checkpoint"] == {
        "metric": "loss",
        "value": 1.0,
        "step": 4,
        "exported": True,
    }
    assert summary["steps_done"] == 8 and not summary["stopped_early"]
    assert "exporting the best checkpoint: step 4" in capsys.readouterr().err


def test_without_keep_best_the_last_step_is_exported(rows, tmp_path, monkeypatch):
    out = tmp_path / "run"
    script = Scripted([3.0, 1.0, 2.0], out)
    monkeypatch.setattr(SftTask, "evaluate", script.as_method())
    assert _train(rows, out, max_steps=6, eval_every=2) == 0
    assert _same(_final_weights(out), script.weights[2])
    best = json.loads((out / "summary.json").read_text())["best_checkpoint"]
    assert best["step"] == 4 and best["exported"] is False


def test_early_stopping_stops_and_exports_the_best(rows, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    script = Scripted([2.0, 1.0, 1.5, 1.0], out)
    monkeypatch.setattr(SftTask, "evaluate", script.as_method())
    code = _train(rows, out, max_steps=10, eval_every=2, early_stopping_patience=2)
    err = capsys.readouterr().err
    assert code == 0, err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # evaluated at 2, 4, 6, 8: no gain in the last two -> stopped (else step 10 would be too)
    assert [json.loads(x)["step"] for x in lines if '"eval"' in x] == [2, 4, 6, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps_done"] == 8 and summary["steps"] == 10
    assert summary["best_checkpoint"]["step"] == 4
    assert _same(_final_weights(out), script.weights[1])
    assert "early stopping at step 8" in err


def _weights_loss(task, model, tokenizer, records, batch_size=16):
    """A validation 'loss' that depends on every bit of the weights (and goes up and down)."""
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        h.update(p.detach().numpy().tobytes())
    v = int(h.hexdigest()[:8], 16) / 2**32
    return {"loss": v, "perplexity": float(torch.tensor(v).exp())}


def test_resume_with_keep_best_is_bitwise(rows, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SftTask, "evaluate", _weights_loss)
    settings = dict(max_steps=8, eval_every=2, keep_best=True, early_stopping_patience=3)
    straight = tmp_path / "straight"
    assert _train(rows, straight, **settings) == 0
    out = tmp_path / "run"
    calls = []

    def interrupt_at_second(task, model, tokenizer, records, batch_size=16):
        calls.append(1)
        if len(calls) == 2:  # after the evaluation of step 4: checkpoint there and stop
            os.kill(os.getpid(), signal.SIGTERM)
        return _weights_loss(task, model, tokenizer, records, batch_size)

    monkeypatch.setattr(SftTask, "evaluate", interrupt_at_second)
    assert _train(rows, out, **settings) == 143
    progress = json.loads((ckpt.checkpoint_dir(out, 4) / "progress.json").read_text())
    assert progress["best"]["best_step"] in (2, 4)
    monkeypatch.setattr(SftTask, "evaluate", _weights_loss)
    assert _train(rows, out, "--resume", "auto", **settings) == 0
    assert "resumed from" in capsys.readouterr().err
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, out))
    assert a["best_checkpoint"] == b["best_checkpoint"]
    assert a["validation"] == b["validation"]
    same = (straight / "metrics.jsonl").read_text().splitlines()
    resumed = (out / "metrics.jsonl").read_text().splitlines()
    strip = [
        {k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "peak_memory_mb")}
        for x in same
    ]
    strip2 = [
        {k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "peak_memory_mb")}
        for x in resumed
    ]
    assert strip == strip2
    fa, fb = _final_weights(straight), _final_weights(out)
    assert all(torch.equal(fa[n], fb[n]) for n in fa)


def test_eval_every_settings_are_checked(rows, tmp_path, capsys):
    assert _train(rows, tmp_path / "a", max_steps=2, keep_best=True) == 2
    assert "'keep_best': needs eval_every" in capsys.readouterr().err
    assert _train(rows, tmp_path / "b", max_steps=2, eval_every=1, n_val=0) == 2
    assert "no validation records" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_directory_as_the_config_is_one_line(tmp_path, capsys):
    code = main(["train", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"molf: error: config '{tmp_path}' is a directory, not a YAML file"
    ]
    assert not (tmp_path / "out").exists()


def test_a_file_as_the_output_dir_is_one_line(rows, tmp_path, capsys):
    file = tmp_path / "taken.txt"
    file.write_text("mine\n")
    assert _train(rows, file, max_steps=2) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"molf: error: output directory {file} is not a directory"]
    assert file.read_text() == "mine\n"
    assert _train(rows, file / "sub", max_steps=2) == 2
    assert f"({file} is a file)" in capsys.readouterr().err
    code = main(["compare", "--budget", "smoke", "--tasks", str(rows), "--output-dir", str(file)])
    assert code == 2 and "is not a directory" in capsys.readouterr().err
    assert file.read_text() == "mine\n"


def test_molf_eval_on_an_sft_run_uses_its_task_options(rows, tmp_path, capsys):
    out = tmp_path / "run"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"q": f"{i}?", "a": f" {i}"}) + "\n" for i in range(4)))
    # the run's own fields and files: molf eval must read them from molf_run.json
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"q": f"{i} and", "a": f" {i + 2}"}) + "\n" for i in range(12))
    )
    args = tiny_run("lora", "sft", max_steps=1, generation_metric="contains", max_new_tokens=2)
    args += ["prompt_field=q", "completion_field=a", "n_test=2", "max_length=32"]
    args += ["--data", str(tmp_path / "train.jsonl"), "--val-data", str(val)]
    assert main(["train", *args, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    info = json.loads((out / "final" / "model" / "molf_run.json").read_text())
    assert info["task_options"]["val_data"] == str(val)
    assert info["task_options"]["prompt_field"] == "q"
    capsys.readouterr()
    model = str(out / "final" / "model")
    assert main(["eval", "--task", "sft", "--model", model, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) == {"loss", "perplexity", "contains"}
    assert result["n_records"] == 2  # n_test of the run, from its --val-data file
    summary = json.loads((out / "summary.json").read_text())
    assert result["metrics"]["loss"] == pytest.approx(summary["after"]["loss"], rel=1e-5)
