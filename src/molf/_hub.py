"""Whether the Hugging Face hub can be used now.

Asked before loading a model or data set by hub id: offline, the hub clients retry with backoff
for most of a minute before failing, where one quick connection attempt says the same at once."""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

from molf.errors import one_line

CHECK_TIMEOUT_S = 3.0


def offline_setting() -> str | None:
    """The environment variable that puts the hub clients in offline mode, if one does (they
    then use their local caches only, and fail at once without them)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
    return None


def unreachable() -> str | None:
    """Why a connection to the hub fails now, or None when one can be made (or a proxy is set,
    about which a direct connection says nothing)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=CHECK_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {one_line(exc)}"


def offline_reason() -> str | None:
    """Why the hub cannot be used now (an offline setting or no connection), or None."""
    return offline_setting() or unreachable()
