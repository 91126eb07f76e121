"""Under DDP every rank takes rank 0's routing decision (`attach_score_reducer`), even when its
own scores would decide otherwise. Two gloo ranks under torchrun; rank 1's gradients are
perturbed so that, left alone, it would route differently from rank 0.

Run as a script (under torchrun), this file is the worker: `python -m torch.distributed.run
--nproc-per-node 2 tests/test_ddp_decision.py OUT [--no-reducer]`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.runs import child_env

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _worker(out: Path, reducer: bool) -> None:
    import torch.distributed as dist

    import molf
    from molf.optim.sharded import attach_score_reducer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model and data on every rank
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
    molf.wrap(model, molf.MoLFConfig(lora_ranks=(4,), lora_alphas=(8.0,), lora_dropout=0.0))
    opt = molf.MoLFAdamW(model, lr_fft=1e-3, lr_lora=1e-3)
    if reducer:
        attach_score_reducer(opt)
    x = torch.randn(8, 16)
    winners = []
    for _ in range(3):
        model(x).pow(2).mean().backward()
        if rank == 1:  # this rank's own scores now favour the LoRA expert in every module
            for m in molf.molf_modules(model).values():
                for p in (m.lora_A[0], m.lora_B[0]):
                    if p.grad is not None:
                        p.grad.mul_(1e3)
                m.base_layer.weight.grad.mul_(1e-3)
        opt.step()
        opt.zero_grad()
        winners.append(opt.routing_log.last()["winners"][:, 0].tolist())  # FFT won, per module
    (out / f"rank{rank}.json").write_text(json.dumps(winners))
    # both ranks reach the teardown together: gloo can abort a rank whose peer tore down first
    dist.barrier()
    dist.destroy_process_group()


def _launch(out: Path, *extra: str) -> dict[int, list]:
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*cmd, __file__, str(out), *extra],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def test_every_rank_takes_rank_0_s_decision(tmp_path):
    alone = _launch(tmp_path / "alone", "--no-reducer")
    # the perturbation works: left alone, rank 1 routes otherwise than rank 0
    assert alone[0] != alone[1]
    assert any(any(step) for step in alone[0])  # rank 0 gives some modules to FFT
    together = _launch(tmp_path / "together")
    assert together[0] == together[1] == alone[0]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), reducer="--no-reducer" not in sys.argv[2:])
