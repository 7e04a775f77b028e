"""Read a job's config: schema defaults <- YAML files <- `--config FILE` <- `key=value` overrides.

Errors (unknown key, wrong type, missing value, unusable URL) raise `ConfigError` with a message
naming the key and what would be right. Nothing here touches Ray or a GPU.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
_SECRET = re.compile(r"(^|_)(key|secret|token|password|passwd|credential|credentials|api_key)s?$", re.I)
_URL_FIELDS = ("url", "val_url", "storage_path", "src", "out", "export_url", "samples", "reference", "shards",
               "inception_path", "val_labels")


class ConfigError(ValueError):
    """A config the schema cannot accept; the message names the key and the allowed values."""


def parse_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a command line into (`--config` files, `key=value` overrides)."""
    files: list[str] = []
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a YAML file path after it")
            files.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        elif a in ("-h", "--help"):
            raise ConfigError("usage: [--config FILE.yaml] [key=value ...]  (e.g. train.max_steps=100)")
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise ConfigError(f"cannot read argument {a!r}: expected `key=value` or `--config FILE`")
        i += 1
    return files, overrides


def _node_at(root: Any, dotted: str) -> Any:
    node = root
    for part in [p for p in dotted.split(".") if p][:-1]:
        node = getattr(node, part, None) if dataclasses.is_dataclass(node) else None
    return node


def _schema_node(schema: type, dotted: str) -> Any:
    """The dataclass type that holds `dotted`'s last component (for listing allowed keys)."""
    cls: Any = schema
    for part in [p for p in dotted.split(".") if p][:-1]:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        cls = hints.get(part)
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
    return cls


def _explain(schema: type, err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).split("\n")[0]
    if isinstance(err, ConfigKeyError):
        holder = _schema_node(schema, key)
        allowed = ", ".join(f.name for f in dataclasses.fields(holder)) if holder else "?"
        return ConfigError(f"unknown config key '{key}'. Allowed keys here: {allowed}")
    if isinstance(err, ValidationError):
        return ConfigError(f"bad value for config key '{key}': {msg}")
    return ConfigError(f"config key '{key}': {msg}")


def _load_yaml(path: str | Path) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    return OmegaConf.create(data)


def _check_urls(obj: Any, prefix: str = "") -> None:
    """Reject unusable storage URLs; make relative local paths absolute (workers run elsewhere)."""
    import fsspec  # local import: cheap, and only needed at validation

    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(val):
            _check_urls(val, key + ".")
        elif f.name in _URL_FIELDS and isinstance(val, str) and val:
            if "://" not in val:
                setattr(obj, f.name, str(Path(val).expanduser().absolute()))
                continue
            proto = val.split("://", 1)[0]
            if "://" in val and not re.fullmatch(r"[a-z][a-z0-9+.-]*", proto):
                raise ConfigError(f"config key '{key}': {val!r} is not a URL (expected /path or s3://bucket/prefix)")
            try:
                fsspec.get_filesystem_class(proto)
            except (ValueError, ImportError) as e:
                raise ConfigError(
                    f"config key '{key}': unsupported storage URL {val!r} ({e}); "
                    "use a local path or s3://bucket/prefix"
                ) from e
            if proto == "s3" and not val[5:].strip("/"):
                raise ConfigError(f"config key '{key}': {val!r} names no bucket (expected s3://bucket/prefix)")


def load_config(
    schema: type[T],
    argv: Sequence[str] = (),
    defaults: Sequence[str | Path] = (),
) -> T:
    """Build a typed config: `schema` defaults, then `defaults` YAML files (paths relative to
    configs/ allowed), then each `--config FILE`, then `key=value` overrides from `argv`."""
    files, overrides = parse_argv(argv)
    try:
        cfg = OmegaConf.structured(schema)
        for path in [*(CONFIG_DIR / d if not Path(d).is_absolute() else Path(d) for d in defaults), *files]:
            cfg = OmegaConf.merge(cfg, _load_yaml(path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise _explain(schema, e) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            "missing required config value(s): " + ", ".join(missing) + " (set them as key=value or in --config FILE)"
        )
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(schema, e) from None
    _check_urls(obj)
    return obj  # type: ignore[return-value]


def cli_config(schema: type[T], argv: Sequence[str], defaults: Sequence[str | Path] = (),
               check: Any = None) -> T:
    """`load_config` for a job's command line: a bad config prints `config error: ...` and exits
    with status 2 (before any Ray or GPU resource is touched). `check(cfg)` may raise ConfigError
    (or ValueError) for job-specific rules."""
    cfg = exit_on_config_error(lambda: load_config(schema, argv, defaults))
    if check is not None:
        exit_on_config_error(lambda: check(cfg))
    return cfg


def exit_on_config_error(fn: Any) -> Any:
    """`fn()`; a ConfigError / ValueError prints `config error: ...` and exits with status 2."""
    import sys

    try:
        return fn()
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def redact(data: Any) -> Any:
    """Copy of a plain dict/list tree with credential-like values replaced by '***'."""
    if isinstance(data, dict):
        return {
            k: ("***" if _SECRET.search(str(k)) and v not in (None, "", {}) else redact(v)) for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data]
    if isinstance(data, str):
        # credentials embedded in URLs: scheme://user:password@host
        return re.sub(r"(://[^/:@]+:)[^@/]+@", r"\1***@", data)
    return data


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config dataclass (tuples as lists), not redacted."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML with secrets redacted: what is saved beside a run."""
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)


def override_dataclass(obj: T, overrides: dict[str, Any], where: str = "overrides") -> T:
    """A copy of dataclass `obj` with fields replaced from a (nested) dict; unknown fields are an
    error naming the field and the allowed ones. Used for `model.*_overrides` on registry presets."""
    if not overrides:
        return obj
    names = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    changes = {}
    for k, v in dict(overrides).items():
        if k not in names:
            raise ConfigError(f"unknown field '{where}.{k}' for {type(obj).__name__}. Allowed: {', '.join(sorted(names))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            v = override_dataclass(cur, v, f"{where}.{k}")
        changes[k] = v
    try:
        return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
