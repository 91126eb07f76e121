"""Known third-party console noise that tells a molf user nothing, silenced by its exact text.

bitsandbytes (imported by peft, and by transformers' Trainer) logs at import, on CPUs with
AVX-512 BF16, that it could not fetch an optional kernel from the hub ("Failed to load CPU
gemm_4bit_forward from kernels-community: ... could not verify publisher trust status ...");
its own fallback then runs, so the line is noise in every `molf` command. The filter sits on the
one logger that emits it and drops that message only: anything else bitsandbytes logs still shows.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_known_noise"]

_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_LINE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_BNB_REASON = "could not verify publisher trust status"


class _KnownKernelNotice(logging.Filter):
    """Drops the one known bitsandbytes kernel-download notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(_BNB_LINE) and _BNB_REASON in message)


def quiet_known_noise() -> None:
    """Install the filter (once; safe to call again). Call it before bitsandbytes is imported:
    the notice is logged at import."""
    logger = logging.getLogger(_BNB_LOGGER)
    if not any(isinstance(f, _KnownKernelNotice) for f in logger.filters):
        logger.addFilter(_KnownKernelNotice())
