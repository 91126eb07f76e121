"""A run's config from YAML plus `key=value` overrides, validated before any compute is spent
(unknown keys get the closest valid one suggested). The `TrainConfig` dataclass and its
per-key checks are in `molf.train.settings`; this module adds what needs the method registry."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from molf.errors import MolfError
from molf.optim.adamw import check_top_k
from molf.train import methods
from molf.train.settings import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"


def check_method(cfg: TrainConfig) -> None:
    """The checks that depend on the run's method: a known name, learning rates that train,
    the values the method implies, and top_k against its number of experts."""
    names = methods.names()
    if cfg.method not in names:
        raise MolfError(
            f"config key 'method': must be one of {', '.join(names)}, got {cfg.method!r}"
        )
    method = methods.get(cfg.method)
    if all(getattr(cfg, key) == 0 for key in method.lr_keys):
        keys = " and ".join(method.lr_keys)
        raise MolfError(
            f"config key '{method.lr_keys[0]}': {cfg.method} trains with {keys}, and a "
            "learning rate of 0 trains nothing; give one > 0"
        )
    for key, value in method.implies.items():
        if getattr(cfg, key) != value:
            raise MolfError(
                f"config key '{key}': method {cfg.method} runs with {key}={value}, "
                f"got {getattr(cfg, key)!r}"
            )
    # the optimizer's own check, named by the config key (any method: a top_k of 0 is wrong
    # even where no routing reads it)
    n_experts = method.n_experts(cfg) if method.n_experts is not None else max(cfg.top_k, 1)
    check_top_k(cfg.top_k, n_experts, "config key 'top_k'")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any) -> Any:
    """Check `value` against the field's type (YAML already typed it; CLI strings are parsed as YAML)."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise MolfError(f"config key '{key}': may not be null")
    base = (
        [a for a in args if a is not type(None)]
        if args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
        else [hint]
    )
    for t in base:
        origin = typing.get_origin(t) or t
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept any float literal
            try:
                return float(value)
            except ValueError:
                pass
        if origin is str and isinstance(value, str):
            return value
        if origin in (tuple, list) and isinstance(value, (list, tuple)):
            inner = typing.get_args(t)[0] if typing.get_args(t) else None
            items = list(value)
            if inner is float and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in items
            ):
                return (
                    tuple(float(v) for v in items) if origin is tuple else [float(v) for v in items]
                )
            if inner is int and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                return tuple(items) if origin is tuple else items
            if inner is str and all(isinstance(v, str) for v in items):
                return tuple(items) if origin is tuple else items
        if origin is dict and isinstance(value, dict):
            return value
    expected = " or ".join(getattr(t, "__name__", str(t)) for t in base) + (
        " or null" if optional else ""
    )
    raise MolfError(
        f"config key '{key}': expected {expected}, got {type(value).__name__} {value!r}"
    )


def typed_value(key: str, raw: str) -> Any:
    """The value of `key=raw` from the command line, typed as TrainConfig's field `key` (an
    unknown key gets the closest one suggested)."""
    _check_key(key)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return _coerce(key, value)


def _check_key(key: str) -> None:
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MolfError(f"unknown config key '{key}'{hint}")


def bundled_configs() -> list[str]:
    """Names of the configs shipped in `configs/`: one per method, and `demo`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a bundled config (e.g. 'molf-e', 'demo')."""
    path = Path(name)
    if path.is_dir():
        raise MolfError(f"config '{name}' is a directory, not a YAML file")
    if path.exists():
        return path
    bundled = CONFIG_DIR / f"{name}.yaml"
    if bundled.exists():
        return bundled
    names = ", ".join(bundled_configs())
    close = difflib.get_close_matches(name, bundled_configs(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise MolfError(f"config '{name}': no such file, and not a bundled config{hint} ({names})")


def load_config(
    path: str | None = None, overrides: list[str] | None = None, **explicit: Any
) -> TrainConfig:
    """Build a TrainConfig from an optional YAML file, `key=value` overrides and keyword values."""
    values: dict[str, Any] = {}
    user_keys: set[str] = set()  # what the user chose (a bundled config's values are defaults)
    if path is not None:
        file = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise MolfError(
                f"config {file}:{where} malformed YAML ({getattr(e, 'problem', e)})"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise MolfError(
                f"config {file}: expected a mapping of key: value, got {type(loaded).__name__}"
            )
        values.update(loaded)
        if file.parent != CONFIG_DIR:
            user_keys |= set(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise MolfError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            values[key.strip()] = raw
    values.update({k: v for k, v in explicit.items() if v is not None})
    user_keys |= {item.split("=", 1)[0].strip() for item in overrides or []}
    user_keys |= {k for k, v in explicit.items() if v is not None}
    for key in values:
        _check_key(key)
    implied = methods.REGISTRY.get(values.get("method", TrainConfig.method))
    for key, value in (implied.implies if implied is not None else {}).items():
        values.setdefault(key, value)
    typed = {key: _coerce(key, value) for key, value in values.items()}
    cfg = TrainConfig(**typed)
    check_method(cfg)
    cfg.validate()
    cfg.user_keys = frozenset(user_keys)
    return cfg


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what `--print-config` shows)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
