"""What a run reports while it trains: metrics.jsonl (and TensorBoard or W&B), the progress bar,
peak memory."""

from __future__ import annotations

import json
import resource
import sys
from typing import TYPE_CHECKING, Any

import torch

from molf.errors import MolfError
from molf.train.config import TrainConfig
from molf.train.run_dir import record

if TYPE_CHECKING:
    pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricLogger:
    """metrics.jsonl in the run directory, plus TensorBoard or W&B when asked for."""

    def __init__(self, cfg: TrainConfig, keep_lines: int | None) -> None:
        self.run_dir = cfg.run_dir
        self.path = cfg.run_dir / "metrics.jsonl"
        record(self.run_dir, "metrics.jsonl")
        if keep_lines is not None and self.path.exists():
            lines = self.path.read_text().splitlines()[:keep_lines]
            self.path.write_text("".join(line + "\n" for line in lines))
        elif keep_lines is None and self.path.exists():
            self.path.unlink()
        self.lines = keep_lines or 0
        self.backend: Any = None
        if cfg.logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MolfError(
                    "logger 'tensorboard' needs the tensorboard package (pip install 'molf[tensorboard]')"
                ) from None
            self.backend = SummaryWriter(str(cfg.run_dir / "tensorboard"))
        elif cfg.logger == "wandb":
            try:
                import wandb
            except ImportError:
                raise MolfError(
                    "logger 'wandb' needs the wandb package (pip install 'molf[wandb]')"
                ) from None
            self.backend = wandb.init(project="molf", dir=str(cfg.run_dir), config=cfg.to_dict())

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1
        if self.backend is not None:
            flat = dict(record)
            for k, v in (flat.pop("eval", None) or {}).items():
                flat[f"eval/{k}"] = v
            scalars = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and k != "step"}
            if hasattr(self.backend, "add_scalar"):
                for k, v in scalars.items():
                    self.backend.add_scalar(k, v, record["step"])
            else:
                self.backend.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.backend is not None:
            (self.backend.close if hasattr(self.backend, "close") else self.backend.finish)()
            record(
                self.run_dir, *(n for n in ("tensorboard", "wandb") if (self.run_dir / n).exists())
            )


class NoLogger:
    """What ranks other than 0 log to: nothing (rank 0 keeps metrics.jsonl)."""

    def __init__(self, keep_lines: int | None) -> None:
        self.lines = keep_lines or 0

    def log(self, record: dict[str, Any]) -> None:
        self.lines += 1

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="train",
        dynamic_ncols=True,
        file=sys.stderr,
    )
