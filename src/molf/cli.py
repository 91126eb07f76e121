"""The `molf` command: train, eval, compare.

Every user error (bad config, missing file, unknown name) is printed as one line
`molf: error: ...` with exit code 2; an interrupted run exits 130 (SIGINT) or 143 (SIGTERM)
after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from molf.errors import MolfError


def _train(args: argparse.Namespace) -> int:
    from molf.train.config import dump_config, load_config

    if args.keys:
        from molf.train.settings import describe_keys

        for name, _, default, text in describe_keys():
            print(f"{name:<24} {default:<14} {text}")
        return 0

    explicit = {
        "method": args.method,
        "task": args.task,
        "model": args.model,
        "output_dir": args.output_dir,
        "data": args.data,
        "val_data": args.val_data,
    }
    cfg = load_config(args.config, args.overrides, **explicit)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.nproc is not None:
        code = _launch_under_torchrun(args, cfg)
        if code is not None:
            return code
    from molf.train.loop import run

    summary = run(cfg, resume=args.resume, overwrite=args.overwrite)
    if summary:  # in a distributed run only rank 0 has one
        print(format_summary(summary))
    return 0


def _launch_under_torchrun(args: argparse.Namespace, cfg: Any) -> int | None:
    """`molf train ... --nproc N`: run the same command as N processes on this machine under
    `torch.distributed.run` (torchrun) and return its exit status; None when already inside a
    launcher with that many processes (the command then simply runs)."""
    import signal
    import subprocess

    world = os.environ.get("WORLD_SIZE")
    if world is not None:
        if world != str(args.nproc):
            raise MolfError(
                f"--nproc {args.nproc}: already launched as {world} processes (WORLD_SIZE); "
                "leave --nproc out under torchrun or accelerate launch"
            )
        return None
    if args.nproc < 1:
        raise MolfError(f"--nproc: must be >= 1, got {args.nproc}")
    from molf.train.distributed import check_launcher, check_setup

    # what every rank would refuse, refused once here
    mode = cfg.distributed if cfg.distributed != "none" else "ddp"
    check_setup(cfg.method, mode, cfg.batch_size, args.nproc)
    check_launcher(mode)
    child = ["-m", "molf.cli", "train"]
    if args.config:
        child.append(args.config)
    child += list(args.overrides or [])
    if cfg.distributed == "none":
        child.append("distributed=ddp")
    for flag, value in (
        ("--method", args.method),
        ("--task", args.task),
        ("--model", args.model),
        ("--output-dir", args.output_dir),
        ("--data", args.data),
        ("--val-data", args.val_data),
        ("--resume", args.resume),
    ):
        if value is not None:
            child += [flag, value]
    if args.overwrite:
        child.append("--overwrite")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(args.nproc), *child]
    # torchrun in its own session: a Ctrl-C reaches it once (forwarded below), not twice, so
    # that every rank gets one signal, writes its part of the checkpoint and exits.
    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if received and code != 0:  # torchrun exits 1 when signalled; keep molf's 130 / 143
        print(f"molf: interrupted by signal {received[0]} (see the checkpoints)", file=sys.stderr)
        return 128 + received[0]
    return code


def format_summary(summary: dict[str, Any]) -> str:
    """A short before/after table of the run's metrics and where its artefacts are."""
    before, after = summary.get("before") or {}, summary["after"]
    lines = [
        f"{summary['method']} on {summary['task']} ({summary['model']}), {summary['steps']} steps, "
        f"{summary['wall_seconds']:.0f} s"
    ]
    width = max(len(k) for k in after)
    lines.append(f"  {'metric':<{width}}  {'before':>8}  {'after':>8}")
    for k, v in after.items():
        b = before.get(k)
        bs = f"{b:8.3f}" if isinstance(b, (int, float)) else f"{'-':>8}"
        lines.append(f"  {k:<{width}}  {bs}  {v:8.3f}")
    if summary.get("routing"):
        overall = summary["routing"]["overall"]
        lines.append("  routing: " + ", ".join(f"{e} {v:.1%}" for e, v in overall.items()))
    for name, path in summary["artefacts"].items():
        lines.append(f"  {name}: {path}")
    if summary.get("run_dir"):
        run_dir = Path(summary["run_dir"])
        files = [("routing log", "routing.jsonl")] if summary.get("routing") else []
        files += [("metrics", "metrics.jsonl"), ("summary", "summary.json")]
        for label, name in files:
            lines.append(f"  {label + ':':<12} {run_dir / name}")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from molf.train.evaluate import evaluate_path, parse_task_options

    options = parse_task_options(args.overrides or [])
    result = evaluate_path(
        args.model,
        args.task,
        data=args.data,
        seed=args.seed,
        n_test=args.n_test,
        batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code,
        n_val=args.n_val,
        options=options,
        threads=args.threads,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{result['task']} on {result['model']} ({result['records']})")
        for k, v in result["metrics"].items():
            print(f"  {k:<22} {v:.4f}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from molf.experiments.compare import run_compare

    return run_compare(args)


def _sweep(args: argparse.Namespace) -> int:
    from molf.experiments.sweep import run_sweep

    return run_sweep(args)


def _planted(args: argparse.Namespace) -> int:
    from molf.experiments.planted import run_planted

    return run_planted(args)


# The subcommands and their one-line help: all `molf --help` shows, without importing the
# training stack (the full parser lists methods, tasks and budgets from their registries).
HELP = {
    "train": "fine-tune a model with one method (fft, lora, molf, molf-e, ...; see train --help)",
    "eval": "evaluate a base model, a saved model or a PEFT adapter on a task",
    "compare": "run a grid of methods x tasks and write a results report",
    "routing-sweep": "what decides MoLF's routing: train MoLF over LoRA alphas and "
    "learning-rate ratios",
    "planted": "make a synthetic teacher-student dataset with a known best expert per module",
}


def _top_parser() -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(
        prog="molf", description="MoLF: Mixture of LoRA and Full fine-tuning"
    )
    return parser, parser.add_subparsers(dest="command", required=True)


def light_parser() -> argparse.ArgumentParser:
    """The top level alone: what `molf` and `molf --help` need, in well under a second."""
    parser, sub = _top_parser()
    for name, text in HELP.items():
        sub.add_parser(name, help=text)
    return parser


def _add_train(sub: Any, method_names: tuple[str, ...], tasks: str, configs: str) -> None:
    t = sub.add_parser("train", help=HELP["train"])
    t.add_argument(
        "config",
        nargs="?",
        help=f"YAML file or bundled config name ({configs})",
    )
    t.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. lr_fft=1e-4 max_steps=50"
    )
    t.add_argument("--method", choices=method_names)
    t.add_argument("--task", help=f"one of {tasks}")
    t.add_argument(
        "--data",
        help="data file, directory or hub id: your own data with --task sft, or the upstream "
        "data of counterfact / medmcqa / gretel",
    )
    t.add_argument(
        "--val-data",
        help="validation file for --task sft (sets val_data; default: a split of --data)",
    )
    t.add_argument(
        "--model", help="smollm2-135m, gemma3-270m, tiny-llama, a local path or a hub id"
    )
    t.add_argument("--output-dir")
    t.add_argument(
        "--resume",
        default="none",
        help="'auto' (latest good checkpoint of the output dir) or a checkpoint path",
    )
    t.add_argument(
        "--overwrite", action="store_true", help="replace a finished run in the output dir"
    )
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument(
        "--keys", action="store_true", help="list every config key with its default and exit"
    )
    t.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="run as N processes on this machine (one per GPU) under torchrun; sets "
        "distributed=ddp unless the config chooses ddp or fsdp2",
    )
    t.set_defaults(func=_train)


def _add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help=HELP["eval"])
    e.add_argument("--task", required=True)
    e.add_argument("--model", required=True)
    e.add_argument(
        "--data",
        help="default: the data the model was trained on (its molf_run.json); other sft data is "
        "scored whole unless --n-test / --n-val or test_split= say otherwise",
    )
    e.add_argument(
        "--seed", type=int, default=None, help="default: the seed the model was trained with"
    )
    e.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="test records (default: the run's; other sft data: every row)",
    )
    e.add_argument(
        "--n-val",
        type=int,
        default=None,
        help="validation rows: with --n-test, score the test split molf train makes with "
        "these sizes on other data",
    )
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument(
        "overrides",
        nargs="*",
        help="task options, e.g. generation_metric=exact_match test_split=test_sft",
    )
    e.set_defaults(func=_eval)


def _add_compare(sub: Any, method_names: tuple[str, ...], tasks: str, budgets: list[str]) -> None:
    c = sub.add_parser(
        "compare",
        help=HELP["compare"],
        description="Train every method on every task under one budget (resumable; finished "
        "cells are skipped, failed ones recorded), pick each learning rate on the validation "
        "split, and write results.csv/md, report.md and plots into the output directory.",
    )
    c.add_argument(
        "--model",
        default=None,
        help="default: the budget's (tiny-llama, smollm2-135m, google/gemma-3-1b-pt)",
    )
    c.add_argument(
        "--tasks",
        default="fact-geo,med-icd10,world-sql",
        help=f"comma list of task names ({tasks}) or data files: a path is the "
        "sft task on that file (its label: the file name)",
    )
    c.add_argument("--methods", default=",".join(method_names), help="comma list")
    c.add_argument(
        "--budget",
        default="small",
        choices=budgets,
        help="smoke: tiny model, seconds; small: smollm2-135m on CPU (7 methods x 3 tasks x 2 "
        "LRs and 3 seeds for the claims: 72 cells, about 9 CPU hours as measured, "
        "docs/compare.md); paper: the paper's GPU settings",
    )
    c.add_argument("--output-dir", default=None, help="default: runs/compare-<budget>")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--lr-grid",
        default=None,
        help="'off' (one LR per method: each grid's first value) or edits like "
        "'fft=1e-4/5e-5,lora=5e-4'; default: the budget's grids",
    )
    c.add_argument(
        "--data",
        action="append",
        metavar="TASK=PATH",
        help="data file or hub id of a task, e.g. counterfact=cf.json (repeatable)",
    )
    c.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: the budget's)"
    )
    c.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="cells at a time, each in its own process; 0: one at a time in this process "
        "(default: the budget's; small: 2 with 1 thread each)",
    )
    c.add_argument(
        "--keep-models",
        default="chosen",
        choices=["chosen", "all", "none"],
        help="whose final/ weights to keep: the chosen LR candidate of each pair (default), all or none",
    )
    c.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="train each chosen learning rate with this many seeds (--seed, --seed + 1, ...; "
        "the split stays --seed's); default: the budget's (small: 3)",
    )
    c.add_argument(
        "--seed-methods",
        default=None,
        help="comma list of the methods that get --seeds (default: those in a paper claim)",
    )
    c.add_argument("--skip-failed", action="store_true", help="do not retry failed cells")
    c.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the cells on disk"
    )
    c.add_argument("--plan", action="store_true", help="print the cells and exit")
    c.add_argument("overrides", nargs="*", help="key=value overrides applied to every cell")
    c.set_defaults(func=_compare)


def _add_sweep(sub: Any, budgets: list[str]) -> None:
    w = sub.add_parser(
        "routing-sweep",
        help=HELP["routing-sweep"],
        description="Train MoLF at every --alphas x --lr-ratios (lr_lora = ratio x lr_fft), "
        "MoLF-E at equal alpha and at equal scale, and FFT and LoRA as references, on each task "
        "of a compare budget, --seeds seeds each (resumable); write sweep.md/csv with the share "
        "of updates routed to each expert (overall, step 1, per module type), the task scores, "
        "plots, and the first-step check of docs/method.md's derivation.",
    )
    w.add_argument("--tasks", default="fact-geo,world-sql", help="comma list of task names")
    w.add_argument("--alphas", default="8,16,32,64", help="MoLF's lora_alpha values")
    w.add_argument("--lr-ratios", default="1,5", help="lr_lora / lr_fft values (lr_fft 1e-4)")
    w.add_argument("--seeds", default="0,1", help="training seeds (the splits use seed 0)")
    w.add_argument(
        "--scores", default="epd", help="MoLF's routing scores to sweep, comma list (epd, pfn)"
    )
    w.add_argument("--budget", default="small", choices=budgets)
    w.add_argument("--model", default=None, help="default: the budget's")
    w.add_argument("--output-dir", default=None, help="default: runs/routing-sweep-<budget>")
    w.add_argument("--jobs", type=int, default=None, help="cells at a time (default: the budget's)")
    w.add_argument("--threads", type=int, default=None, help="torch threads per cell")
    w.add_argument("--report-only", action="store_true", help="rebuild the report from the cells")
    w.add_argument("--no-first-step", action="store_true", help="skip the derivation check")
    w.add_argument("--plan", action="store_true", help="print the cells and exit")
    w.add_argument(
        "--predict",
        action="store_true",
        help="train nothing: predict each task's step-1 FFT share at every alpha x ratio from "
        "one forward and backward pass (docs/method.md section 8), write predict.md and exit",
    )
    w.add_argument("overrides", nargs="*", help="key=value overrides applied to every cell")
    w.set_defaults(func=_sweep)


def _add_planted(sub: Any) -> None:
    from molf.experiments.planted import CHANGES

    p = sub.add_parser(
        "planted",
        help=HELP["planted"],
        description="Make a teacher from --model by adding a change to every linear layer of its "
        "decoder layers (full-rank or rank --rank per module type, each --strength x ||W|| in "
        "Frobenius norm), let it continue ICD-10-CM descriptions, and write a dataset folder for "
        "--task planted (or a --tasks entry of compare and routing-sweep). planted.json records "
        "the change per module: the ground truth routing is scored against.",
    )
    p.add_argument("--model", default="smollm2-135m", help="the base model (train from it too)")
    p.add_argument("--output-dir", required=True, help="a new folder")
    p.add_argument(
        "--change",
        default="full",
        choices=list(CHANGES),
        help="full: every type full-rank; low: every type low-rank; mixed: q, gate, up full-rank "
        "and k, v, o, down low-rank",
    )
    p.add_argument("--rank", type=int, default=4, help="rank of a low-rank change")
    p.add_argument("--strength", type=float, default=0.3, help="||change|| / ||W|| per module")
    p.add_argument("--n-train", type=int, default=256, help="training prompts")
    p.add_argument("--n-val", type=int, default=32, help="validation prompts")
    p.add_argument("--n-test", type=int, default=128, help="test prompts")
    p.add_argument("--length", type=int, default=24, help="continuation tokens per prompt")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sample the training continuations at this temperature (noisy labels); 0: greedy",
    )
    p.add_argument("--seed", type=int, default=0, help="the change and the prompts")
    p.set_defaults(func=_planted)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: every subcommand with its options and the registries' choices."""
    from molf.experiments.grid import BUDGETS
    from molf.tasks import task_names
    from molf.train import methods
    from molf.train.config import bundled_configs

    parser, sub = _top_parser()
    tasks = ", ".join(task_names())
    _add_train(sub, methods.names(), tasks, ", ".join(bundled_configs()))
    _add_eval(sub)
    _add_compare(sub, methods.names(), tasks, list(BUDGETS))
    _add_sweep(sub, list(BUDGETS))
    _add_planted(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `molf` console script."""
    given = sys.argv[1:] if argv is None else list(argv)
    if not given or given[0] in ("-h", "--help"):
        light_parser().parse_args(given)  # prints the help (or says a command is needed)
        return 0
    from molf._quiet import quiet_known_noise

    quiet_known_noise()  # before anything imports bitsandbytes, which logs it at import
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from molf.train.loop import Interrupted
    except ModuleNotFoundError as e:  # `pip install molf` brings the core only
        print(
            f"molf: error: the molf command needs the training extras (missing module "
            f"'{e.name}'): pip install 'molf[train]'",
            file=sys.stderr,
        )
        return 2
    parser = build_parser()
    # key=value overrides may come after options; argparse leaves those in `extra`
    args, extra = parser.parse_known_args(argv)
    unknown = [
        x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")
    ]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None
    try:
        return args.func(args)
    except MolfError as e:
        print(f"molf: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"molf: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("molf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
