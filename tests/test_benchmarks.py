"""The benchmark scripts run, at tiny sizes: the GPU check's CPU dry run (which runs
optimizer_step, optimizer_ops and train_step the way a GPU session will), routing_log and
qlora_memory."""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REQUIRE_ALL, skip_unless

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("MOLF_OPTIMIZER_BACKEND", None)
    return env


def test_gpu_check_dry_run_on_cpu_runs_every_part_into_one_results_file(tmp_path):
    out = tmp_path / "results"
    cmd = ["bash", str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["gpu_check.txt"]  # everything in the one folder
    text = (out / "gpu_check.txt").read_text()
    for part in ["optimizer-device", "train-1b", "train-smollm2", "optimizer-eager"]:
        assert f"-- {part}: ok" in text, part
    assert "skipped the NCCL distributed tests: they need 2 GPUs" in text
    assert "all parts passed" in text and "0 CUDA devices" in text
    # what each part is there for reached the file
    assert "MoLFAdamW, FFT wins everywhere (device)" in text and "syncs/step" in text
    assert "1b architecture" in text and "target <= 1.05x" in text
    assert "-- optimizer-device: targets not counted in --quick (tiny sizes)" in text


def test_gpu_check_refuses_unknown_arguments_and_a_machine_without_a_gpu(tmp_path):
    for args, message in [
        (["--fast"], "unknown argument --fast"),
        (["--device", "cpu"], "--out DIR is required"),
        (["--out", str(tmp_path / "x"), "--limit", "ten"], "--limit must be a whole number"),
    ]:
        proc = subprocess.run(
            ["bash", str(SCRIPT), *args], env=_env(), capture_output=True, text=True
        )
        assert proc.returncode == 2 and message in proc.stderr, args
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "r"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out)], env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no CUDA device" in (out / "gpu_check.txt").read_text()


def _fake_python(tmp_path: Path, benchmarks: str) -> Path:
    """A stand-in interpreter for gpu_check.sh: the benchmark scripts run `benchmarks` (shell),
    everything else (the torch version query) the real Python."""
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        f"  *benchmarks/*) {benchmarks} ;;\n"
        f'  *) exec {sys.executable} "$@" ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    return fake


def test_gpu_check_reports_a_missed_target_in_the_file_and_the_exit_status(tmp_path):
    verdicts = (
        'echo "  MoLF worst case (FFT wins): 1.412x, target <= 1.3x: MISSED"; '
        'echo "  MoLF LoRA wins everywhere: 0.950x, target <= 1.0x: met"'
    )
    env = dict(_env(), PYTHON=str(_fake_python(tmp_path, verdicts)))
    out = tmp_path / "results"
    cmd = ["bash", str(SCRIPT), "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout[-3000:]
    text = (out / "gpu_check.txt").read_text()
    assert "-- optimizer-device: targets 1 met, 1 MISSED" in text
    assert "performance targets: 5 met, 5 MISSED" in text  # five benchmark parts, one each
    assert "  optimizer-device: MoLF worst case (FFT wins): 1.412x, target <= 1.3x: MISSED" in text
    assert "all parts passed" not in text and "exit status 3" in text


def test_gpu_check_runs_python3_offline_without_being_told(tmp_path):
    """On a lent machine with `python3` and no `python` on PATH, no PYTHON set and no network:
    the check finds python3 itself and runs every part offline."""
    offline = 'echo "offline: $HF_HUB_OFFLINE $TRANSFORMERS_OFFLINE $HF_DATASETS_OFFLINE"'
    bin_dir = _fake_python(tmp_path, offline).parent
    python = bin_dir / "python"  # a `python` the check must not pick over python3
    python.write_text("#!/usr/bin/env bash\nexit 97\n")
    python.chmod(0o755)
    env = {k: v for k, v in _env().items() if not k.endswith("_OFFLINE") and k != "PYTHON"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    out = tmp_path / "results"
    cmd = ["bash", str(SCRIPT), "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    text = (out / "gpu_check.txt").read_text()
    assert f"python: {bin_dir / 'python3'}" in text
    assert text.count("offline: 1 1 1") == 5  # the five benchmark parts
    assert "all parts passed" in text


def test_gpu_check_keeps_to_its_time_limit(tmp_path):
    """The whole check ends within --limit: a part runs under the time left, later ones are not
    started, and the summary says so."""
    env = dict(_env(), PYTHON=str(_fake_python(tmp_path, "sleep 120")))
    out = tmp_path / "results"
    cmd = ["bash", str(SCRIPT), "--device", "cpu", "--out", str(out), "--limit", "30"]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert took < 30, took
    text = (out / "gpu_check.txt").read_text()
    # the part that starts sleeps past the limit and is stopped (on a loaded machine the
    # preamble alone can leave too little time to start it: then it is not run at all)
    if "-- optimizer-device: FAILED: stopped at its" in text:
        assert proc.returncode == 1, proc.stdout[-3000:]
        assert "NOT RUN (time limit): train-1b train-smollm2 optimizer-eager compile-cost" in text
    else:
        assert "-- optimizer-device: NOT RUN" in text, text
        assert proc.returncode == 4, proc.stdout[-3000:]
    assert "-- train-1b: NOT RUN" in text and "-- compile-cost: NOT RUN" in text


def _ops_rows(text: str) -> list[list[str]]:
    """The data rows of optimizer_ops.py's tables: [backend, layers, routed, chunks, calls off,
    calls on, reads, copies], in order."""
    rows = []
    for line in text.splitlines():
        if line.startswith(("native ", "eager ", "device ")):
            f = line.split()
            calls = [f"{f[4]} {f[5]}", f"{f[6]} {f[7]}"]
            reads = " ".join(f[8:11]) if f[8] != "n/a" else "CPU only"
            copies = f[11] if f[8] != "n/a" else "CPU only"
            rows.append([*f[:4], *calls, reads, copies])
    return rows


def test_the_performance_page_s_operator_counts_are_the_committed_run_s():
    """Each row of the page's operator-count table is a row of benchmarks/results/optimizer_ops.txt
    (the second command's device rows are the page's 'chunk 2^28' rows)."""
    committed = _ops_rows((ROOT / "benchmarks" / "results" / "optimizer_ops.txt").read_text())
    page = (ROOT / "docs" / "performance.md").read_text()
    table = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in page.splitlines()
        if line.startswith(("| native |", "| eager |", "| device |", "| device, chunk 2^28 |"))
    ]
    assert len(table) == len(committed) == 8
    for shown, measured in zip(table, committed):
        shown[0] = shown[0].removesuffix(", chunk 2^28")
        assert shown == measured


def test_optimizer_ops_benchmark_counts_calls_and_reads():
    """At one layer the native and device backends make the calls the committed run made at 10
    and 30 (device: one chunk): they do not grow with the depth; eager's do."""
    from molf.optim.kernels import cpu_kernels

    have_native = cpu_kernels() is not None
    skip_unless(have_native or not REQUIRE_ALL, "the native CPU kernels (a C++ compiler)")
    backends = ["eager", "device"] + (["native"] if have_native else [])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "optimizer_ops.py"), "--layers", "1"]
    cmd += ["--vocab", "512", "--backends", *backends]
    env = dict(_env(), PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r[0]: r for r in _ops_rows(proc.stdout)}
    assert rows["device"][6:] == ["0 / 0", "3"]  # blocking reads with the log off / on, copies
    assert rows["eager"][6] == "1 / 1"
    committed = _ops_rows((ROOT / "benchmarks" / "results" / "optimizer_ops.txt").read_text())
    for r in committed:
        if r[0] in rows and r[0] != "eager" and r[3] in ("1", "-"):
            assert rows[r[0]][4:6] == r[4:6], r
    eager_at_10 = next(r for r in committed if r[0] == "eager" and r[1] == "10")
    assert int(rows["eager"][4].split()[0]) < int(eager_at_10[4].split()[0])


def test_routing_log_benchmark_compares_streamed_and_in_memory_logs():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "routing_log.py"), "--steps", "30", "60"]
    env = dict(_env(), PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        line.split() for line in proc.stdout.splitlines() if line.startswith(("streamed", "kept"))
    ]
    assert [r[0] for r in rows] == ["streamed"] * 2 + ["kept"] * 2


def test_qlora_memory_benchmark_runs_molf_e_and_lora_on_one_quantized_base():
    skip_unless(importlib.util.find_spec("bitsandbytes") is not None, "bitsandbytes")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "qlora_memory.py"), "--layers", "1"]
    cmd += ["--vocab", "256", "--steps", "1", "--batch", "1", "--seq", "8"]
    env = dict(_env(), PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # every linear of the one decoder layer is a 4-bit base that MoLF-E wrapped
    assert "molf-e wrapped 7 layers of type Linear4bit" in out
    rows = [line.split() for line in out.splitlines() if "MiB" in line]
    assert [r[0] for r in rows] == ["lora", "lora", "molf-e"]  # r128, r160, MoLF-E
    assert "vs lora r128: time" in out and "vs lora r160: time" in out


def _fixed_width_tables(text: str) -> dict[tuple[str, str], list[dict[str, str]]]:
    """The rows of a benchmark output's tables, by (section, first cell), in order: {column:
    cell}. A table is a header line over a line of dash runs, which give the columns; a section
    is the line that opens a model's part ('MoLF-E (...): ...' -> 'MoLF-E'), '' before any."""
    lines = text.splitlines()
    rows: dict[tuple[str, str], list[dict[str, str]]] = {}
    section = ""
    for i, line in enumerate(lines):
        if "trainable tensors" in line and not line.startswith(" "):
            section = line.split(" (", 1)[0]
        if i == 0 or not re.fullmatch(r"-+( +-+)*", line.rstrip()):
            continue
        spans = [m.span() for m in re.finditer(r"-+", line)]
        starts = [s for s, _ in spans] + [10**6]

        def cells(text: str, starts: list[int] = starts) -> list[str]:
            return [text[a:b].strip() for a, b in zip(starts, starts[1:])]

        header = cells(lines[i - 1])
        for row in lines[i + 1 :]:
            if not row.strip() or row.startswith(" "):
                break
            values = cells(row)
            rows.setdefault((section, values[0]), []).append(dict(zip(header, values)))
    return rows


# the performance page's measured tables, each under its command's committed output file
MEASURED = ["optimizer_step.txt", "optimizer_step_eager.txt", "optimizer_step_device.txt"]
MEASURED += ["train_step.txt", "compile_cost.txt", "routing_log.txt"]


@pytest.mark.parametrize("name", MEASURED)
def test_the_performance_page_s_tables_are_the_committed_benchmark_output(name):
    """Below 'Output: `benchmarks/results/NAME`' the page's table shows rows of that file:
    every cell is the file's under the same column (a row whose other cells are empty names the
    file's section)."""
    text = (ROOT / "benchmarks" / "results" / name).read_text()
    measured = _fixed_width_tables(text)
    page = (ROOT / "docs" / "performance.md").read_text().replace("**", "")
    marker = f"Output: `benchmarks/results/{name}`"
    assert page.count(marker) == 1, marker
    after = page[page.index(marker) :].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    table = []
    for line in after[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, rows = table[0], table[2:]
    section, checked, seen = "", 0, {}
    for row in rows:
        if not any(row[1:]):  # a section: its parameter count is the file's
            section = row[0].split(" (", 1)[0]
            opening = next(x for x in text.splitlines() if x.startswith(f"{section} ("))
            assert opening.endswith(row[0].rsplit(", ", 1)[-1]), (name, row[0])
            continue
        # the n-th row of a name on the page is the n-th row of that name in the file
        n = seen[(section, row[0])] = seen.get((section, row[0]), -1) + 1
        found = measured[(section, row[0])][n]
        for column, shown in zip(header[1:], row[1:]):
            assert shown == found[column], (name, section, row[0], column)
            checked += 1
    assert checked >= 6, name
    if name == "train_step.txt":  # the targets' ratios the page quotes below the table
        flops = re.search(r"(\d+\.\d+)x the FLOP ratio", text).group(1)
        lora = re.search(r"molf-e time / lora r160 time = (\d+\.\d+)", text).group(1)
        assert f"{flops}x the FLOP ratio" in page and f"{lora}x the time of a LoRA" in page
