"""RoutingLog: which expert won, per step and module, with every expert's score.

Kept in memory as small CPU tensors, written as JSONL (one line per step), and summarised as the
share of module-steps routed to each expert: overall, per layer index and per module type
(q/k/v/o/gate/up/down), which is what the paper's routing figures plot.

A long run streams the log instead (`stream_to`): each record is appended to the JSONL file when
it completes and only running totals stay in memory, so memory and checkpoint cost do not grow
with the step count; a checkpoint stores `state_dict()` (how many bytes of the file are valid and
the totals) and resuming truncates the file there, so the log stays bitwise what an
uninterrupted run writes. Records of tensors on an accelerator are copied to pinned host memory
without blocking and completed when the log is next used (normally at the next step), so that
logging never makes the optimizer step wait for the device.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch

from molf.errors import MolfError

_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The decoder-layer index in a dotted name like 'model.layers.3.self_attn.q_proj'."""
    match = _LAYER_RE.search("." + module_name + ".")
    return int(match.group(1)) if match else None


def module_type(module_name: str) -> str:
    """The short type of a module: 'q_proj' -> 'q', 'gate_proj' -> 'gate', else the last name."""
    last = module_name.rsplit(".", 1)[-1]
    return last[: -len("_proj")] if last.endswith("_proj") else last


class RoutingLog:
    """Per-step routing decisions of a MoLFAdamW.

    `records` is a list of dicts with `step` (int), `winners` ([modules, experts] bool),
    `scores` ([modules, experts] float32) and `active` ([modules] bool: modules that had a
    gradient that step; inactive ones are never routed).
    """

    def __init__(self, module_names: list[str], expert_names: list[str]) -> None:
        self.module_names = list(module_names)
        self.expert_names = list(expert_names)
        self._records: list[dict[str, Any]] = []
        self._pending: tuple[int, tuple[torch.Tensor, ...], Any] | None = None
        self._last: dict[str, Any] | None = None
        # streaming (see the module docstring): the file, or None to keep totals only
        self.streaming = False
        self._file: IO[str] | None = None
        self._steps = 0
        self._wins = torch.zeros(len(self.module_names), len(self.expert_names), dtype=torch.int64)
        self._active = torch.zeros(len(self.module_names), dtype=torch.int64)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records kept in memory, oldest first (none while streaming: read the file)."""
        self.flush()
        return self._records

    @records.setter
    def records(self, value: list[dict[str, Any]]) -> None:
        self.flush()
        self._records = value

    def append(
        self, step: int, winners: torch.Tensor, scores: torch.Tensor, active: torch.Tensor
    ) -> None:
        """Add one step's record: winners [modules, experts] bool, scores [modules, experts] and
        active [modules] bool, on any device. Tensors on an accelerator are copied to the host
        without blocking; the record completes when the log is next used."""
        self.flush()
        tensors = (winners, scores, active)
        if all(t.device.type == "cpu" for t in tensors):
            self._complete(step, *tensors)
            return
        cuda = winners.device.type == "cuda"
        host = tuple(
            torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda).copy_(t, non_blocking=True)
            for t in tensors
        )
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = (step, host, event)

    def flush(self) -> None:
        """Complete the record whose copy from the device may still be running (waiting for it
        only if it has not finished: normally it has, a step later)."""
        if self._pending is None:
            return
        step, host, event = self._pending
        self._pending = None
        if event is not None and not event.query():
            event.synchronize()
        self._complete(step, *host)

    def _complete(
        self, step: int, winners: torch.Tensor, scores: torch.Tensor, active: torch.Tensor
    ) -> None:
        rec = {
            "step": int(step),
            "winners": winners.bool(),
            "scores": scores.float(),
            "active": active.bool(),
        }
        self._last = rec
        if not self.streaming:
            self._records.append(rec)
            return
        self._steps += 1
        self._wins += (rec["winners"] & rec["active"][:, None]).to(torch.int64)
        self._active += rec["active"].to(torch.int64)
        if self._file is not None:
            self._file.write(json.dumps(self.record_to_json(rec)) + "\n")

    def last(self) -> dict[str, Any] | None:
        """The newest record (completing it first), or None before the first step."""
        self.flush()
        return self._last

    def __len__(self) -> int:
        """Steps recorded (kept in memory, or streamed)."""
        self.flush()
        return self._steps if self.streaming else len(self._records)

    def clear(self) -> None:
        self.flush()
        self._records.clear()

    # -- streaming ------------------------------------------------------------------------------
    def stream_to(self, path: str | Path | None, state: dict[str, Any] | None = None) -> None:
        """From now on append each record to the JSONL file `path` (None: write nothing, e.g. on
        ranks other than the first) and keep only running totals in memory.

        Without `state` the file starts afresh (header, then the records kept so far). With a
        `state_dict()` saved in a checkpoint, the file is cut back to what was valid then and
        the totals restored, so a resumed run writes the same file as an uninterrupted one."""
        self.flush()
        self.close()
        kept, self._records = self._records, []
        self.streaming = True
        self._steps = 0
        self._wins.zero_()
        self._active.zero_()
        if state is not None:
            self._steps = int(state["steps"])
            self._wins.copy_(torch.tensor(state["wins"], dtype=torch.int64))
            self._active.copy_(torch.tensor(state["active"], dtype=torch.int64))
        if path is None:
            return
        path = Path(path)
        if state is None:
            self._file = path.open("w")
            header = {"modules": self.module_names, "experts": self.expert_names}
            self._file.write(json.dumps(header) + "\n")
        else:
            size = path.stat().st_size if path.exists() else -1
            if size < state["bytes"]:
                raise MolfError(
                    f"routing log {path}: {max(size, 0)} bytes, shorter than the {state['bytes']} "
                    "the checkpoint recorded; the run directory is not the one checkpointed"
                )
            self._file = path.open("r+")
            self._file.truncate(state["bytes"])
            self._file.seek(state["bytes"])
        for rec in kept:
            self._complete(rec["step"], rec["winners"], rec["scores"], rec["active"])

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores of a streaming log (JSON-serialisable): how many bytes of the
        file are valid (written and flushed to disk) and the running totals."""
        if not self.streaming:
            raise ValueError("RoutingLog.state_dict: only a streaming log has one (stream_to)")
        self.flush()
        size = 0
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            size = self._file.tell()
        return {
            "bytes": size,
            "steps": self._steps,
            "wins": self._wins.tolist(),
            "active": self._active.tolist(),
        }

    def close(self) -> None:
        """Complete the last record and close the stream's file (the totals stay)."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _require_records(self, what: str) -> None:
        """Refuse a per-record query on a streaming log, which keeps only running totals."""
        if self.streaming:
            raise MolfError(
                f"RoutingLog.{what}: this log streams its records to a file (stream_to) and keeps "
                "only running totals in memory; read the file with RoutingLog.read_jsonl(path) "
                "for per-step queries"
            )

    def winner_indices(self) -> torch.Tensor:
        """[steps, modules] int64 index of the (first) winner, -1 where a module was inactive.
        A streaming log refuses (MoLFError): its records are in its file."""
        self._require_records("winner_indices")
        if not self.records:
            return torch.empty(0, len(self.module_names), dtype=torch.int64)
        rows = []
        for r in self.records:
            idx = r["winners"].to(torch.int8).argmax(dim=1).to(torch.int64)
            idx[~r["active"]] = -1
            rows.append(idx)
        return torch.stack(rows)

    # -- persistence ----------------------------------------------------------------------------
    def record_to_json(self, r: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": r["step"],
            "winners": [
                [j for j in range(len(self.expert_names)) if row[j]]
                for row in r["winners"].tolist()
            ],
            "scores": r["scores"].tolist(),
            "active": r["active"].tolist(),
        }

    def write_jsonl(self, path: str | Path, append: bool = False) -> None:
        """Write a header line (module and expert names) then one line per step."""
        path = Path(path)
        mode = "a" if append and path.exists() else "w"
        with path.open(mode) as f:
            if mode == "w":
                f.write(
                    json.dumps({"modules": self.module_names, "experts": self.expert_names}) + "\n"
                )
            for r in self.records:
                f.write(json.dumps(self.record_to_json(r)) + "\n")

    @classmethod
    def read_jsonl(cls, path: str | Path) -> RoutingLog:
        """Load a log written by `write_jsonl`."""
        lines = Path(path).read_text().splitlines()
        if not lines:
            raise ValueError(f"{path}: empty routing log")
        header = json.loads(lines[0])
        log = cls(header["modules"], header["experts"])
        n_e = len(log.expert_names)
        for line in lines[1:]:
            if not line.strip():
                continue
            d = json.loads(line)
            winners = torch.zeros(len(log.module_names), n_e, dtype=torch.bool)
            for mi, ws in enumerate(d["winners"]):
                winners[mi, ws] = True
            log.append(
                d["step"],
                winners,
                torch.tensor(d["scores"], dtype=torch.float32),
                torch.tensor(d["active"], dtype=torch.bool),
            )
        return log

    # -- summaries ------------------------------------------------------------------------------
    def _counts(self, steps: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Per module: how often each expert won ([modules, experts]) and how many steps it
        was active ([modules]), over the kept records `steps` or, streaming, the whole run."""
        if self.streaming:
            self.flush()
            return self._wins, self._active
        wins = torch.zeros(len(self.module_names), len(self.expert_names), dtype=torch.int64)
        active = torch.zeros(len(self.module_names), dtype=torch.int64)
        for r in self.records[steps]:
            wins += (r["winners"] & r["active"][:, None]).to(torch.int64)
            active += r["active"].to(torch.int64)
        return wins, active

    def _shares(self, modules: Iterable[int], steps: slice = slice(None)) -> dict[str, float]:
        modules = list(modules)
        wins, active = self._counts(steps)
        counts = wins[modules].sum(dim=0).to(torch.float64)
        total = int(active[modules].sum())
        if total == 0:
            return {e: 0.0 for e in self.expert_names}
        return {e: float(c) / total for e, c in zip(self.expert_names, counts)}

    def overall_shares(self, start: int = 0) -> dict[str, float]:
        """Share of module-steps won by each expert over `records[start:]` (e.g. since the last
        time a caller logged them); with top-k > 1 the shares sum to k. A streaming log answers
        for the whole run only (start 0) and refuses a later start."""
        if start:
            self._require_records(f"overall_shares(start={start})")
        return self._shares(range(len(self.module_names)), slice(start, None))

    def share_over_steps(self, expert: int = 0) -> list[tuple[int, float]]:
        """(step, share of active modules where `expert` won) for every step (a streaming log
        refuses: its records are in its file)."""
        self._require_records("share_over_steps")
        out = []
        for r in self.records:
            act = r["active"]
            n = int(act.sum())
            out.append((r["step"], float(r["winners"][act, expert].sum()) / n if n else 0.0))
        return out

    def summary(self) -> dict[str, Any]:
        """Shares of module-steps won by each expert: overall, per layer index, per module type.

        With top-k > 1 a module-step counts for each of its winners, so shares sum to k.
        """
        all_modules = range(len(self.module_names))
        by_layer: dict[int, list[int]] = defaultdict(list)
        by_type: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(self.module_names):
            li = layer_index(name)
            if li is not None:
                by_layer[li].append(i)
            by_type[module_type(name)].append(i)
        return {
            "steps": len(self),
            "experts": list(self.expert_names),
            "overall": self._shares(all_modules),
            "per_layer": {str(k): self._shares(v) for k, v in sorted(by_layer.items())},
            "per_type": {k: self._shares(v) for k, v in by_type.items()},
        }

    def format_summary(self) -> str:
        """A few readable lines: overall shares and the share of the first expert per type."""
        s = self.summary()
        lines = [f"routing over {s['steps']} steps, {len(self.module_names)} modules:"]
        lines.append("  overall: " + ", ".join(f"{e} {v:.1%}" for e, v in s["overall"].items()))
        first = self.expert_names[0]
        if s["per_type"]:
            lines.append(
                f"  {first} share by type: "
                + ", ".join(f"{t} {v[first]:.0%}" for t, v in s["per_type"].items())
            )
        if s["per_layer"]:
            lines.append(
                f"  {first} share by layer: "
                + ", ".join(f"{k}:{v[first]:.0%}" for k, v in s["per_layer"].items())
            )
        return "\n".join(lines)
