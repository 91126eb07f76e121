"""The native CPU backend of MoLFAdamW: the pointer layout the kernels read, and the kernels
themselves (`kernels/molf_step_cpu.cpp`), built once per machine with the system C++ compiler
(as torch.compile's CPU backend does) and cached under `molf._files.cache_root()`. They
read and write the tensors in place through their data pointers; `NativeLayout` checks dtypes
and layout first. `molf.optim.adamw` drives them; nothing here is public API."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from molf._files import cache_root

if TYPE_CHECKING:
    from molf.optim.adamw import MoLFAdamW

KERNEL_SOURCE = Path(__file__).with_name("kernels") / "molf_step_cpu.cpp"


@functools.cache
def kernel_source() -> str:
    """The C++ source of the kernels (package data next to this module)."""
    return KERNEL_SOURCE.read_text()


class NativeLayout:
    """What the kernels need that stays the same from step to step (pointers to parameters,
    moments, step counts and win counters, sizes, dtypes), for one set of active modules and of
    other parameters with gradients. Built once, checked every step, rebuilt when any of it
    changes (another active set, `load_state_dict`, a parameter given new storage...)."""

    def __init__(
        self,
        opt: MoLFAdamW,
        key: tuple[tuple[bool, ...], tuple[bool, ...]],
        routed_grads: list[torch.Tensor | None],
        plain_grads: list[torch.Tensor | None],
    ) -> None:
        self.key = key
        self.state = opt.state
        self.why: str | None = None
        # (param, its state, exp_avg, exp_avg_sq, step, param data pointer): checked every step
        self.entries: list[tuple] = []
        self.wins: list[tuple[dict, torch.Tensor]] = []
        # per gradient slot: (index into the step's gradient list or -1, expected dtype, param)
        self.routed_grads: list[tuple[int, torch.dtype | None, torch.Tensor | None]] = []
        self.plain_grads: list[tuple[int, torch.dtype | None, torch.Tensor | None]] = []
        self.plain_group: list[int] = []
        cols: dict[str, list[int]] = {k: [] for k in COLUMNS}
        cols.update({"p" + k: [] for k in COLUMNS[:-1]})  # the other parameters: no expert
        active, plain_has = key
        start = opt._module_start
        wins = [0] * len(active)
        for mi, is_active in enumerate(active):
            for t in range(start[mi], start[mi + 1]):
                p, _, j = opt._flat[t]
                if not is_active:  # never read by the kernels, but every column keeps one row
                    for col in COLUMNS[:-1]:
                        cols[col].append(0)
                    cols["expert"].append(j)
                    self.routed_grads.append((-1, None, None))
                    continue
                self.why = self._add(opt, cols, "", p, routed_grads[t], j, t, self.routed_grads)
                if self.why is not None:
                    return
            if is_active:
                st = opt.state[opt._anchors[mi]]
                w = opt._wins(mi, torch.device("cpu"))
                self.wins.append((st, w))
                wins[mi] = w.data_ptr()
        for i, ((p, gi), has) in enumerate(zip(opt._plain, plain_has)):
            if has:
                self.why = self._add(opt, cols, "p", p, plain_grads[i], 0, i, self.plain_grads)
                if self.why is not None:
                    return
                self.plain_group.append(gi)
        self.arrays = {k: torch.tensor(v, dtype=torch.int64) for k, v in cols.items()}
        self.arrays["mod_start"] = torch.tensor(start, dtype=torch.int64)
        self.arrays["active"] = torch.tensor(active, dtype=torch.uint8)
        self.arrays["wins"] = torch.tensor(wins, dtype=torch.int64)
        self.arrays["numel_exp"] = opt._numel.to("cpu", torch.float64).contiguous()

    def _add(
        self,
        opt: MoLFAdamW,
        cols: dict[str, list[int]],
        prefix: str,
        p: torch.Tensor,
        grad: torch.Tensor | None,
        expert: int,
        index: int,
        grad_slots: list,
    ) -> str | None:
        st = opt._init_state(p)
        m, v, step = st["exp_avg"], st["exp_avg_sq"], st["step"]
        g_dtype = p.dtype if grad is None else grad.dtype
        combo = COMBOS.get((p.dtype, g_dtype, m.dtype))
        if combo is None or v.dtype != m.dtype:
            return f"dtypes param {p.dtype}, grad {g_dtype}, moments {m.dtype}"
        tensors = (p, m, v) if grad is None else (p, grad, m, v)
        if not all(dense_cpu(t) and t.numel() == p.numel() for t in tensors):
            return "a parameter, gradient or moment that is not a contiguous CPU tensor"
        if not (step.is_cpu and step.dtype == torch.float32 and step.is_contiguous()):
            step = st["step"] = step.to("cpu", torch.float32).contiguous()
        try:
            ptr = p.data_ptr()
            values = (ptr, m.data_ptr(), v.data_ptr(), step.data_ptr(), p.numel(), combo, expert)
        except RuntimeError:  # tensor subclasses without storage, e.g. DTensor
            return f"parameters of type {type(p).__name__}"
        for col, value in zip(COLUMNS, values):
            if prefix and col == "expert":
                continue
            cols[prefix + col].append(value)
        self.entries.append((p, st, m, v, step, ptr))
        grad_slots.append((index, g_dtype, p))
        return None

    def is_current(self, state: dict) -> bool:
        """Whether every pointer is still right: same state tensors and parameter storage."""
        return (
            state is self.state
            and all(
                state.get(p) is st
                and st.get("exp_avg") is m
                and st.get("exp_avg_sq") is v
                and st.get("step") is s
                and p.data_ptr() == ptr
                for p, st, m, v, s, ptr in self.entries
            )
            and all(st.get("wins") is w for st, w in self.wins)
        )

    def grad_pointers(
        self,
        routed_grads: list[torch.Tensor | None],
        plain_grads: list[torch.Tensor | None],
        keep: list[torch.Tensor],
    ) -> tuple[list[int], list[int]] | None:
        """This step's gradient pointers (zeros for a tensor of an active module without one),
        or None when a gradient does not match the dtype and layout the layout was built for."""
        out = []
        for grads, slots in ((routed_grads, self.routed_grads), (plain_grads, self.plain_grads)):
            ptrs = []
            for index, dtype, p in slots:
                if index < 0:
                    ptrs.append(0)
                    continue
                g = grads[index]
                if g is None:
                    if p.dtype != dtype:
                        return None
                    g = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    keep.append(g)
                elif g.dtype != dtype or not dense_cpu(g) or g.numel() != p.numel():
                    return None
                ptrs.append(g.data_ptr())
            out.append(ptrs)
        return out[0], out[1]


COLUMNS = ("p", "m", "v", "step", "numel", "combo", "expert")


def dense_cpu(t: torch.Tensor) -> bool:
    return t.is_cpu and t.layout == torch.strided and t.is_contiguous()


# -- CPU kernels --------------------------------------------------------------------------------

FUSED, SCORE, APPLY = 0, 1, 2
MAX_EXPERTS = 64
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
COMBOS = {
    (p, g, m): DTYPE_CODES[p] + 4 * DTYPE_CODES[g] + 16 * DTYPE_CODES[m]
    for p, g, m in [
        (torch.float32, torch.float32, torch.float32),
        (torch.float64, torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float32),
        (torch.float16, torch.float32, torch.float32),
        (torch.float16, torch.float16, torch.float16),
    ]
}


class KernelArgs(ctypes.Structure):
    """The C struct MolfStep, field by field (pointers as integers)."""

    _fields_ = (
        [
            (name, ctypes.c_int64)
            for name in (
                "n_mod n_exp mod_start expert p g m v step numel combo active numel_exp lr wd wins "
                "totals scores winners n_plain pp pg pm pv pstep pnumel pcombo plr pwd"
            ).split()
        ]
        + [(name, ctypes.c_double) for name in ("b1", "b2", "eps")]
        + [(name, ctypes.c_int64) for name in ("kind", "top_k", "phase", "n_threads")]
    )


KERNEL_STATE: dict[str, Any] = {"lib": None, "error": None, "tried": False}
KERNEL_LOCK = threading.Lock()


def cache_dir() -> Path:
    return cache_root() / "kernels"


def cpu_fingerprint() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def build(cxx: str, flags: list[str], out: Path) -> str | None:
    """Compile the kernels into `out`; returns None or the compiler's complaint."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / "molf_kernels.cpp"
            src.write_text(kernel_source())
            lib = Path(tmp) / out.name
            cmd = [cxx, *flags, "-shared", "-fPIC", "-o", str(lib), str(src)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                return (res.stderr.strip().splitlines() or ["failed"])[-1]
            os.replace(lib, out)  # atomic: concurrent processes see a whole library or none
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None


def cpu_kernels() -> ctypes.CDLL | None:
    """The compiled kernels (built and cached on first use), or None if they cannot be built."""
    with KERNEL_LOCK:
        if KERNEL_STATE["tried"]:
            return KERNEL_STATE["lib"]
        KERNEL_STATE["tried"] = True
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None or sys.byteorder != "little":
            KERNEL_STATE["error"] = (
                "no C++ compiler found (set CXX)" if cxx is None else "a big-endian host"
            )
            return None
        try:
            source = kernel_source()
        except OSError as e:  # an install that left out the package data
            KERNEL_STATE["error"] = f"kernel source missing: {e}"
            return None
        base = ["-O3", "-std=c++17", "-fno-math-errno"]
        # Fastest first; each fallback drops what some compilers lack (-march=native, OpenMP).
        attempts = [
            base + ["-march=native", "-fopenmp"],
            base + ["-fopenmp"],
            base + ["-march=native", "-fopenmp-simd"],
            base,
        ]
        errors = []
        for flags in attempts:
            key = hashlib.sha256(
                "\n".join([source, cxx, *flags, cpu_fingerprint()]).encode()
            ).hexdigest()[:16]
            path = cache_dir() / f"molf_kernels_{key}.so"
            if not path.exists():
                error = build(cxx, flags, path)
                if error is not None and not cache_dir().is_dir():  # unwritable cache: a temp dir
                    path = Path(tempfile.gettempdir()) / "molf-kernels" / path.name
                    error = None if path.exists() else build(cxx, flags, path)
                if error is not None:
                    errors.append(error)
                    continue
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                errors.append(str(e))
                continue
            lib.molf_step.argtypes = [ctypes.POINTER(KernelArgs)]
            lib.molf_step.restype = ctypes.c_int
            KERNEL_STATE["lib"] = lib
            return lib
        KERNEL_STATE["error"] = errors[-1] if errors else "unknown error"
        return None


def run_kernel(lib: ctypes.CDLL, args: KernelArgs) -> None:
    if lib.molf_step(ctypes.byref(args)) != 0:
        raise RuntimeError(f"molf kernels: more than {MAX_EXPERTS} experts per module")
