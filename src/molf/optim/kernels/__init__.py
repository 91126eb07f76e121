"""The C++ kernels of the native backend (`molf_step_cpu.cpp`, package data next to this file):
built once per machine with the system C++ compiler (as torch.compile's CPU backend does),
cached under $MOLF_CACHE_DIR or ~/.cache/molf, loaded with ctypes. `KernelArgs` mirrors the C
struct the kernels read; `molf.optim.backends.native` fills it. Nothing here is public API."""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from molf._files import cache_root

KERNEL_SOURCE = Path(__file__).with_name("molf_step_cpu.cpp")

FUSED, SCORE, APPLY = 0, 1, 2  # phases: the whole step; moments and totals only; winners only
MAX_EXPERTS = 64
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# The (param, grad, moments) dtypes the kernels are built for (MOLF_COMBOS in the .cpp), by code.
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

_POINTERS = (
    "mod_start expert decay p g m v step numel combo active numel_exp lr wd wins totals scores "
    "winners"
).split()
_PLAIN_POINTERS = "pp pg pm pv pstep pnumel pcombo plr pwd".split()


class KernelArgs(ctypes.Structure):
    """The C struct `MolfStep` of molf_step_cpu.cpp, field by field and in its order."""

    _fields_ = (
        [("n_mod", ctypes.c_int64), ("n_exp", ctypes.c_int64)]
        + [(name, ctypes.c_void_p) for name in _POINTERS]
        + [("n_plain", ctypes.c_int64)]
        + [(name, ctypes.c_void_p) for name in _PLAIN_POINTERS]
        + [(name, ctypes.c_double) for name in ("b1", "b2", "eps", "score_eps")]
        + [(name, ctypes.c_int64) for name in ("kind", "top_k", "phase", "n_threads")]
    )

    @classmethod
    def filled(cls, values: dict[str, Any]) -> KernelArgs:
        """The struct with every field set from `values` (tensors by their data pointer); a
        missing or unknown field is an error, never a silent zero."""
        names = [name for name, _ in cls._fields_]
        if set(values) != set(names):
            missing, extra = set(names) - set(values), set(values) - set(names)
            raise ValueError(f"KernelArgs: missing {sorted(missing)}, unknown {sorted(extra)}")
        return cls(**{k: v.data_ptr() if torch.is_tensor(v) else v for k, v in values.items()})


@dataclass(frozen=True)
class CpuKernels:
    """The loaded library and the ids of the score kernels it implements (by name)."""

    lib: ctypes.CDLL
    score_ids: dict[str, int]

    def run(self, args: KernelArgs) -> None:
        code = self.lib.molf_step(ctypes.byref(args))
        if code == -1:
            raise RuntimeError(f"molf kernels: more than {MAX_EXPERTS} experts per module")
        if code != 0:
            raise RuntimeError(f"molf kernels: unknown score kernel id {args.kind}")


@functools.cache
def kernel_source() -> str:
    """The C++ source of the kernels."""
    return KERNEL_SOURCE.read_text()


KERNEL_STATE: dict[str, Any] = {"kernels": None, "error": None, "tried": False}
KERNEL_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where built kernels are kept: under molf's one cache directory."""
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


def _load(path: Path) -> CpuKernels:
    lib = ctypes.CDLL(str(path))
    lib.molf_step.argtypes = [ctypes.POINTER(KernelArgs)]
    lib.molf_step.restype = ctypes.c_int
    lib.molf_score_kernels.argtypes = []
    lib.molf_score_kernels.restype = ctypes.c_char_p
    names = lib.molf_score_kernels().decode().split()
    return CpuKernels(lib, {name: i for i, name in enumerate(names)})


def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels (built and cached on first use), or None if they cannot be built
    (`KERNEL_STATE["error"]` then says why)."""
    with KERNEL_LOCK:
        if KERNEL_STATE["tried"]:
            return KERNEL_STATE["kernels"]
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
                KERNEL_STATE["kernels"] = _load(path)
            except (OSError, AttributeError) as e:
                errors.append(str(e))
                continue
            return KERNEL_STATE["kernels"]
        KERNEL_STATE["error"] = errors[-1] if errors else "unknown error"
        return None
