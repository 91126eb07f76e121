"""What a routing log says, in numbers the reports show: the share of module updates an expert
won (overall, over steps, per layer and step, per module type) and the first step's scores."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from molf.routing import RoutingLog, layer_index, module_type

TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


def expert_share(log: RoutingLog, expert: int, steps: slice = slice(None)) -> float | None:
    """Share of active module-steps in `steps` where `expert` won (None when nothing was active)."""
    won = total = 0
    for r in log.records[steps]:
        act = r["active"]
        won += int(r["winners"][act, expert].sum())
        total += int(act.sum())
    return won / total if total else None


def layer_step_matrix(log: RoutingLog, expert: int) -> tuple[list[int], list[int], np.ndarray]:
    """(layer indices, steps, [layers, steps] share of the layer's active modules won by `expert`).

    Cells where no module of the layer was active are NaN. Modules outside numbered layers are left
    out.
    """
    layers = sorted({li for n in log.module_names if (li := layer_index(n)) is not None})
    rows = {
        li: [i for i, n in enumerate(log.module_names) if layer_index(n) == li] for li in layers
    }
    steps = [int(r["step"]) for r in log.records]
    matrix = np.full((len(layers), len(steps)), np.nan)
    for s, r in enumerate(log.records):
        won = r["winners"][:, expert] & r["active"]
        for row, li in enumerate(layers):
            idx = rows[li]
            n_active = int(r["active"][idx].sum())
            if n_active:
                matrix[row, s] = int(won[idx].sum()) / n_active
    return layers, steps, matrix


def type_shares(log: RoutingLog, expert: int) -> dict[str, float | None]:
    """Share of active module-steps won by `expert`, per module type (q, k, v, o, gate, ...)."""
    by_type: dict[str, list[int]] = {}
    for i, name in enumerate(log.module_names):
        by_type.setdefault(module_type(name), []).append(i)
    order = [t for t in TYPE_ORDER if t in by_type] + sorted(
        t for t in by_type if t not in TYPE_ORDER
    )
    out: dict[str, float | None] = {}
    for t in order:
        idx = by_type[t]
        won = total = 0
        for r in log.records:
            act = r["active"][idx]
            won += int(r["winners"][idx][:, expert][act].sum())
            total += int(act.sum())
        out[t] = won / total if total else None
    return out


def read_routing_log(directory: Path | None) -> RoutingLog | None:
    """The routing log of a run directory; None without one (or with an unreadable or empty one)."""
    if directory is None or not (directory / "routing.jsonl").exists():
        return None
    try:
        log = RoutingLog.read_jsonl(directory / "routing.jsonl")
    except (OSError, ValueError, KeyError):
        return None
    return log if log.records else None


def first_step_ratios(log: RoutingLog) -> dict[str, float]:
    """{module name: score(second expert) / score(first expert)} at the first step, for the
    modules active then; above 1 the second expert wins."""
    first = log.records[0]
    return {
        name: float(first["scores"][i, 1] / first["scores"][i, 0])
        for i, name in enumerate(log.module_names)
        if bool(first["active"][i])
    }


def median(values: list[float]) -> float | None:
    """The median of the finite values (None without any)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None


def routing_figures(log: RoutingLog) -> dict[str, Any]:
    """The routing sweep's numbers for one log: the first expert's share of module updates
    overall, at the first step, in the last quarter and per module type (`share_<type>`), and the
    first step's median score ratio, second expert over first, overall and per type."""
    records = log.records
    if not records:
        return {}
    n = len(records)
    ratios = first_step_ratios(log)
    out: dict[str, Any] = {
        "share": expert_share(log, 0),
        "share_step1": expert_share(log, 0, slice(0, 1)),
        "share_last_quarter": expert_share(log, 0, slice(n - max(1, n // 4), n)),
        "ratio_step1": median(list(ratios.values())),
        "steps": n,
    }
    for t, share in type_shares(log, 0).items():
        out[f"share_{t}"] = share
        out[f"ratio_step1_{t}"] = median([r for m, r in ratios.items() if module_type(m) == t])
    return out
