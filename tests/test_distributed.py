"""Distributed training on CPU: 2 gloo ranks under torchrun (`molf train --nproc 2`).

DDP and FSDP2 must give the losses, routing decisions (and scores) at every step and final
weights of one process on the same global batch, within float32 tolerance; an FSDP2 run stopped
by a signal that only one rank received checkpoints at the same step on both ranks, and
resuming it gives the uninterrupted run bitwise. Plus the refusals (DeepSpeed, FSDP1, batch
sizes that do not split, a multi-process launch without a distributed mode).

Run as a script, this file is the worker of the signal test (see `_signal_worker`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.runs import child_env, tiny_run, train

GRAD_ACCUM = 2
# lr_fft = 2 lr_lora at lora_alpha 16 makes this tiny model route about half its modules to each
# expert, with score margins far above float32 noise; no dropout, so that every rank sees the
# one-process computation.
RUN = tiny_run(
    "molf",
    n_train=16,
    n_val=0,
    n_test=2,
    max_steps=6,
    batch_size=4,
    grad_accum=GRAD_ACCUM,
    lora_rank=4,
    lr_fft="2e-3",
    lr_lora="1e-3",
    lora_alpha=16,
    lora_dropout=0,
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _train(out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return train(RUN, out, *extra, timeout=300, **env)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _ok(_train(out))
    return out


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    proc = _train(out, "distributed=fsdp2", "--nproc", "2")
    _ok(proc)
    assert proc.stdout.count("routing:") == 1, "only rank 0 prints the summary"
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _routing(run: Path) -> list[dict]:
    from molf.routing import RoutingLog

    return RoutingLog.read_jsonl(run / "routing.jsonl").records


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model" / "model.safetensors"))


def _assert_same_training(ref: Path, run: Path, exact: bool = False) -> None:
    """Same losses, grad norms, routing decisions and scores at every step, same final model."""
    a, b = _metrics(ref), _metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "lr", "route_fft", "route_lora_r4"):
            if exact:
                assert x[key] == y[key], (x["step"], key)
            else:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    ra, rb = _routing(ref), _routing(run)
    assert len(ra) == len(rb) == 6
    shares = []
    for x, y in zip(ra, rb):
        assert torch.equal(x["winners"], y["winners"]), x["step"]
        # scores too: dividing by a shard's size instead of the expert's would still pick the
        # same winners when all experts are split alike, but not give these numbers
        if exact:
            assert torch.equal(x["scores"], y["scores"])
        else:
            torch.testing.assert_close(y["scores"], x["scores"], rtol=1e-4, atol=0)
        shares.append(x["winners"][:, 0].float().mean().item())
    assert 0 < min(shares) and max(shares) < 1, "both experts must win somewhere"
    wa, wb = _weights(ref), _weights(run)
    assert set(wa) == set(wb)
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    assert sb["routing"]["overall"] == sa["routing"]["overall"]


# -- equivalence with one process ------------------------------------------------------------------
def test_ddp_matches_one_process(one_process, tmp_path):
    out = tmp_path / "ddp"
    proc = _train(out, "--nproc", "2")  # distributed=ddp is set by --nproc
    _ok(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["distributed"] == "ddp" and summary["world_size"] == 2
    assert proc.stdout.count("routing:") == 1, "only rank 0 prints the summary"
    _assert_same_training(one_process, out)


def test_fsdp2_matches_one_process(one_process, fsdp2_run):
    summary = json.loads((fsdp2_run / "summary.json").read_text())
    assert summary["config"]["distributed"] == "fsdp2" and summary["world_size"] == 2
    _assert_same_training(one_process, fsdp2_run)


def test_fsdp2_with_the_device_backend_matches_one_process(one_process, tmp_path):
    # the accelerators' default backend, on gloo: local shards, score totals summed over ranks
    out = tmp_path / "fsdp2-device"
    proc = _train(out, "distributed=fsdp2", "--nproc", "2", MOLF_OPTIMIZER_BACKEND="device")
    _ok(proc)
    _assert_same_training(one_process, out)


# -- FSDP2: signal on one rank, sharded checkpoint, resume ---------------------------------------
def _signal_worker(argv: list[str]) -> int:
    """Under torchrun: rank 1 alone sends itself SIGTERM during step 3 (its 5th micro-batch)."""
    import molf.train.loop as train_mod
    from molf.cli import main

    if os.environ.get("RANK") == "1":
        calls = [0]
        collate = train_mod.collate

        def collate_then_signal(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2 * GRAD_ACCUM + 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return collate(*args, **kwargs)

        train_mod.collate = collate_then_signal
    return main(["train", *argv])


def test_fsdp2_signal_checkpoint_and_resume_match_the_uninterrupted_run(fsdp2_run, tmp_path):
    from molf.train import checkpoint as ckpt

    out = tmp_path / "resumed"
    argv = [*RUN, "distributed=fsdp2", "--output-dir", str(out)]
    worker = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    worker += ["--nproc-per-node", "2", __file__, *argv]
    first = subprocess.run(worker, env=child_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode != 0
    # both ranks stopped after the same step (3), with one checkpoint, and exit 143
    assert first.stderr.count("interrupted (exit 143)") == 2, first.stderr[-3000:]
    points = ckpt.list_checkpoints(out)
    assert [p.name for p in points] == ["step-0000003"]
    assert ckpt.verify(points[0]) is None
    assert sorted(p.name for p in points[0].glob("rng-rank*.pt")) == [
        "rng-rank00000.pt",
        "rng-rank00001.pt",
    ]
    assert len(list((points[0] / "dcp").glob("*.safetensors"))) == 2  # one shard file per rank
    assert not (out / "summary.json").exists()

    alone = tmp_path / "resumed-by-one-process"
    shutil.copytree(out, alone)
    second = _train(out, "distributed=fsdp2", "--nproc", "2", "--resume", "auto")
    _ok(second)
    assert "at step 3" in second.stderr
    _assert_same_training(fsdp2_run, out, exact=True)
    # DCP reshards: the same checkpoint resumed by one process continues the same training
    _ok(_train(alone, "--resume", "auto"))
    _assert_same_training(fsdp2_run, alone)


# -- refusals --------------------------------------------------------------------------------------
def test_batch_size_that_does_not_split_over_the_ranks_is_one_clear_error(tmp_path, capsys):
    from molf.cli import main

    code = main(
        ["train", *RUN, "batch_size=3", "--output-dir", str(tmp_path / "r"), "--nproc", "2"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "config key 'batch_size': 3 examples per micro-batch" in err and "over 2" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP1 flattens parameters"),
        ({"WORLD_SIZE": "2"}, "config key 'distributed' is 'none'"),
    ],
)
def test_launchers_that_would_route_wrongly_are_refused(monkeypatch, env, message):
    from molf.errors import MolfError
    from molf.train.distributed import check_launcher

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    mode = "none" if "WORLD_SIZE" in env else "fsdp2"
    with pytest.raises(MolfError, match=message):
        check_launcher(mode)


def test_adalora_under_fsdp2_is_refused_before_launching(tmp_path, capsys):
    from molf.cli import main

    out = tmp_path / "r"
    code = main(
        [
            "train",
            *RUN,
            "--method",
            "adalora",
            "distributed=fsdp2",
            "--output-dir",
            str(out),
            "--nproc",
            "2",
        ]
    )
    assert code == 2
    assert "method 'adalora' cannot run under fsdp2" in capsys.readouterr().err
    assert not out.exists()


def test_accelerate_with_fsdp2_is_accepted(monkeypatch):
    from molf.train.distributed import check_launcher

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_launcher("fsdp2")


@pytest.fixture
def world_of_one(tmp_path):
    """A one-process gloo group in this process, for engines that need one."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_a_rank_failing_to_write_its_shards_leaves_no_checkpoint(world_of_one, tmp_path):
    from molf.train.distributed import DistContext, collective_signed_directory

    def fill_all(tmp):
        (tmp / "half.safetensors").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    root = tmp_path / "checkpoints"
    with pytest.raises(OSError, match="rank 0: No space left on device"):
        collective_signed_directory(
            DistContext("ddp"), root / "step-0000001", fill_all, lambda tmp: None
        )
    assert list(root.iterdir()) == []


def test_fsdp1_and_flat_parameters_are_refused(world_of_one):
    from torch.distributed.fsdp import FullyShardedDataParallel

    import molf
    from molf.errors import MolfError
    from molf.optim.sharded import check_model
    from tests.conftest import tiny_causal_lm

    model = molf.wrap(tiny_causal_lm(), molf.MoLFConfig(lora_ranks=(4,)))
    check_model(model)  # a plain wrapped model is fine
    fsdp1 = FullyShardedDataParallel(model, use_orig_params=False, device_id=torch.device("cpu"))
    with pytest.raises(MolfError, match="FSDP1"):
        check_model(fsdp1)
    with pytest.raises(MolfError, match="FSDP1"):  # the optimizer refuses it too
        molf.MoLFAdamW(fsdp1)


@pytest.mark.parametrize("backend", ["auto", "device"])
def test_fsdp2_optimizer_in_a_world_of_one_equals_the_plain_optimizer(world_of_one, backend):
    """The DTensor path of MoLFAdamW (local partials, reducer, global numel) on one rank is the
    plain optimizer: same decisions, same weights."""
    from torch.distributed.device_mesh import init_device_mesh

    import molf
    from molf.train.distributed import DistContext, shard_fsdp2
    from tests.conftest import tiny_causal_lm

    ctx = DistContext("fsdp2", mesh=init_device_mesh("cpu", (1,)))
    cfg = molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0)
    torch.manual_seed(0)
    plain = molf.wrap(tiny_causal_lm(), cfg)
    torch.manual_seed(0)
    sharded = shard_fsdp2(molf.wrap(tiny_causal_lm(), cfg), ctx)
    kwargs = dict(lr_fft=2e-3, lr_lora=1e-3, backend=backend)
    opt_plain, opt_sharded = molf.MoLFAdamW(plain, **kwargs), molf.MoLFAdamW(sharded, **kwargs)
    # DTensor parameters: the optimizer sums its score totals over the shard group by itself
    assert opt_plain.score_reducer is None and opt_sharded.score_reducer is not None
    reduced = []
    reducer = opt_sharded.score_reducer
    opt_sharded.score_reducer = lambda t: reduced.append(t.shape) or reducer(t)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randint(0, 96, (2, 12), generator=g)
        for model, opt in ((plain, opt_plain), (sharded, opt_sharded)):
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    assert len(reduced) == 4  # one reduction of the packed [modules, experts] totals per step
    assert reduced[0] == (len(opt_plain.module_names), 2)
    for a, b in zip(opt_plain.routing_log.records, opt_sharded.routing_log.records):
        assert torch.equal(a["winners"], b["winners"])
        torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-5, atol=0)
    full = {n: p.full_tensor() for n, p in sharded.named_parameters()}
    for n, p in plain.named_parameters():
        torch.testing.assert_close(full[n], p, rtol=1e-5, atol=1e-6, msg=n)


if __name__ == "__main__":
    sys.exit(_signal_worker(sys.argv[1:]))
