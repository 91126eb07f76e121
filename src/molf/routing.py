"""RoutingLog: which expert won, per step and module, with every expert's score.

Kept in memory as small CPU tensors, written as JSONL (one line per step), and summarised as the
share of module-steps routed to each expert: overall, per layer index and per module type
(q/k/v/o/gate/up/down), which is what the paper's routing figures plot.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

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
        self.records: list[dict[str, Any]] = []

    def append(
        self, step: int, winners: torch.Tensor, scores: torch.Tensor, active: torch.Tensor
    ) -> None:
        self.records.append({"step": step, "winners": winners, "scores": scores, "active": active})

    def __len__(self) -> int:
        return len(self.records)

    def clear(self) -> None:
        self.records.clear()

    def winner_indices(self) -> torch.Tensor:
        """[steps, modules] int64 index of the (first) winner, -1 where a module was inactive."""
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
    def _shares(self, modules: Iterable[int], steps: slice = slice(None)) -> dict[str, float]:
        modules = list(modules)
        counts = torch.zeros(len(self.expert_names), dtype=torch.float64)
        total = 0
        for r in self.records[steps]:
            act = r["active"][modules]
            counts += r["winners"][modules][act].sum(dim=0).to(torch.float64)
            total += int(act.sum())
        if total == 0:
            return {e: 0.0 for e in self.expert_names}
        return {e: float(c) / total for e, c in zip(self.expert_names, counts)}

    def overall_shares(self, start: int = 0) -> dict[str, float]:
        """Share of module-steps won by each expert over `records[start:]` (e.g. since the last
        time a caller logged them); with top-k > 1 the shares sum to k."""
        return self._shares(range(len(self.module_names)), slice(start, None))

    def share_over_steps(self, expert: int = 0) -> list[tuple[int, float]]:
        """(step, share of active modules where `expert` won) for every step."""
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
            "steps": len(self.records),
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
