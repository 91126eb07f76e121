"""`make demo`: fine-tune the embedded SmolLM2-135M on embedded counterfactual facts with MoLF,
evaluate before and after, and print where everything went. Runs offline on a CPU."""

from __future__ import annotations

import os
import sys
import warnings

from molf.errors import MolfError


def main() -> int:
    from molf._quiet import quiet_known_noise

    quiet_known_noise()
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from molf.cli import format_summary
    from molf.train.config import load_config
    from molf.train.loop import run

    cfg = load_config("demo", sys.argv[1:])
    print(
        f"molf demo: {cfg.method} on {cfg.task} with {cfg.model} "
        f"({cfg.n_train} counterfactual facts to inject, {cfg.n_test} of them scored, "
        f"{cfg.epochs:g} epochs) -> {cfg.run_dir}",
        flush=True,
    )
    try:
        summary = run(cfg, overwrite=True)
    except MolfError as e:
        print(f"molf: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
