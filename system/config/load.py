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

# configs/ beside system/: the checkout's, or the copy `pip install .` puts in site-packages (pyproject.toml)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# credential names only (whole field names): `key`, `secret`, `*_api_key`, `*_token`, `password` ...;
# never names that merely end like one (`num_latent_tokens`, `keep_last`)
_SECRET = re.compile(r"^(key|secret|token|password|passwd|credentials?|(\w+_)?(api_key|access_key|access_key_id|"
                     r"secret_key|secret_access_key|session_token|auth_token|password))$", re.I)
_OUTPUT_FIELDS = ("storage_path", "out")  # where a job writes: must outlive a `ray job submit` working dir
_URL_FIELDS = ("url", "val_url", "storage_path", "src", "out", "export_url", "samples", "reference", "shards",
               "inception_path", "val_labels", "val_synsets", "tokenizer_export", "stage1_export", "images", "val_images", "export",
               "decoder_init")
# words a URL field may hold instead of a location (method.decoder_init=random: an explicit random init)
_URL_WORDS = ("random",)


class ConfigError(ValueError):
    """A config the schema cannot accept; the message names the key and the allowed values."""


class HelpRequested(Exception):
    """`-h` / `--help` on a job's command line."""


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
            files.append(user_config_path(args[i + 1]))
            i += 2
            continue
        if a.startswith("--config="):
            files.append(user_config_path(a.split("=", 1)[1]))
        elif a in ("-h", "--help"):
            raise HelpRequested()
        elif a in ("--debug", "--dry-run"):
            pass  # --debug: read by exit_on_config_error (tracebacks); --dry-run: by the job (`dry_run_requested`)
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise ConfigError(f"cannot read argument {a!r}: expected `key=value` or `--config FILE`")
        i += 1
    return files, overrides


def help_files(argv: Sequence[str]) -> list[str]:
    """The `--config` files of a command line that asks for `--help` (its defaults show them applied),
    absolute (`help_text` reads relative names under configs/, as a job's own defaults)."""
    try:
        return [str(Path(f).absolute()) for f in parse_argv([a for a in argv if a not in ("-h", "--help")])[0]]
    except ConfigError:
        return []


def dry_run_requested(argv: Sequence[str]) -> bool:
    """`--dry-run` on a job's command line: plan every step at its configured size and start nothing."""
    return "--dry-run" in argv


def peek(argv: Sequence[str], key: str, default: Any) -> Any:
    """The value a command line gives a top-level `key` (its --config files, then `key=value`), before
    any schema reads it: a job whose schema depends on it (train_ar's `objective`, alitok's `stage`)
    picks the schema with it, and that schema then reads and checks the whole config. `default`
    when unset or unreadable (the full load names the problem)."""
    try:
        files, overrides = parse_argv([a for a in argv if a not in ("-h", "--help")])
        value = default
        for f in files:
            value = (yaml.safe_load(Path(f).read_text()) or {}).get(key, value)
        for o in overrides:
            k, _, v = o.partition("=")
            value = yaml.safe_load(v) if k == key else value
    except Exception:  # noqa: BLE001
        return default
    return value


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


def explain(schema: type, err: OmegaConfBaseException) -> ConfigError:
    """An OmegaConf error while reading `schema` as a ConfigError naming the key."""
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).split("\n")[0]
    if isinstance(err, ConfigKeyError):
        holder = _schema_node(schema, key)
        allowed = ", ".join(f.name for f in dataclasses.fields(holder)) if holder else "?"
        return ConfigError(f"unknown config key '{key}'. Allowed keys here: {allowed}")
    if isinstance(err, ValidationError):
        return ConfigError(f"bad value for config key '{key}': {msg}")
    return ConfigError(f"config key '{key}': {msg}")


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML file holding a mapping, as an OmegaConf tree (ConfigError naming the file otherwise)."""
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


def _submitted_working_dir() -> bool:
    """True inside a driver started by `ray job submit --working-dir` (its cwd is Ray's temporary
    copy of the package, deleted with the cluster)."""
    import json
    import os

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        return bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


# a run's name is its folder under the storage path and a word of the commands printed for it
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _check_run_name(key: str, val: Any) -> None:
    if isinstance(val, str) and not _RUN_NAME.fullmatch(val):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", val).strip("-._")[:128] or "run-1"
        raise ConfigError(f"config key '{key}' = {val!r} is not a usable run name: it names one folder and appears in "
                          f"the printed commands, so it must be one path segment of letters, digits, '.', '_' and '-' "
                          f"(starting with a letter or digit, at most 128 characters), e.g. {key}={safe}")


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Declared value ranges (system/config/ranges.py); run names (one safe path segment); unusable
    storage URLs; relative local paths made absolute (workers run elsewhere), refused for outputs
    under `ray job submit --working-dir`."""
    import fsspec  # local import: cheap, and only needed at validation

    from system.config.ranges import in_range

    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        rule = f.metadata.get("range")
        if rule and not in_range(val, rule):
            raise ConfigError(f"config key '{key}' = {val!r} is out of range: it must be {rule}")
        if f.name == "run_name":
            _check_run_name(key, val)
        if dataclasses.is_dataclass(val):
            _check_fields(val, key + ".")
        elif f.name in _URL_FIELDS and isinstance(val, str) and val and val not in _URL_WORDS:
            if "://" not in val:
                if f.name in _OUTPUT_FIELDS and not Path(val).expanduser().is_absolute() and _submitted_working_dir():
                    raise ConfigError(
                        f"config key '{key}' = {val!r} is a relative path: under `ray job submit --working-dir` it "
                        f"would resolve inside Ray's temporary package folder ({Path.cwd()}), which disappears with "
                        f"the cluster (and a resubmission after any code edit would start over). Give an absolute path "
                        f"on storage every node shares, or s3://bucket/prefix")
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
        for path in [*(config_path(d) for d in defaults), *files]:
            cfg = OmegaConf.merge(cfg, load_yaml(path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise explain(schema, e) from None
    return finish_config(schema, cfg)


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of the typed config `cfg` with `key=value` overrides applied and checked like a job's."""
    schema = type(cfg)
    try:
        tree = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise explain(schema, e) from None
    return finish_config(schema, tree)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a plain nested dict (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}."))
    return out


_ABSENT = object()


def load_sectioned_config(schema: type[T], argv: Sequence[str], defaults: Sequence[str | Path],
                          section_defaults: dict[str, list[str]], wire: Any) -> T:
    """A config made of sections that are other jobs' configs (a pipeline: system/pipelines/):
    each section starts from its own job's default files (`section_defaults`, then the config's
    `section_configs`), then `defaults`, `--config FILE`s and `key=value` overrides apply, then
    `wire(cfg)` sets the keys that join the sections (attribute assignments on the typed tree, e.g.
    `cfg.ar.data.url = ...`). A key the files or command line set to another value than the wiring
    gives it is an error naming the key; the same value is accepted (a saved config loads again)."""
    files, overrides = parse_argv(argv)
    try:
        user = OmegaConf.create({})
        for path in [*(config_path(d) for d in defaults), *files]:
            user = OmegaConf.merge(user, load_yaml(path))
        if overrides:
            user = OmegaConf.merge(user, OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.structured(schema)
        extra = OmegaConf.to_container(user.get("section_configs", OmegaConf.create({})))
        for section in {**section_defaults, **extra}:
            for path in [*section_defaults.get(section, []), *extra.get(section, [])]:
                if section not in cfg:
                    raise ConfigError(f"config key 'section_configs.{section}': no such section; sections: "
                                      f"{', '.join(k for k in cfg if OmegaConf.is_config(cfg[k]))}")
                cfg = OmegaConf.merge(cfg, {section: load_yaml(config_path(path))})
        cfg = OmegaConf.merge(cfg, user)
        before = _leaves(OmegaConf.to_container(cfg))
        wire(cfg)
        after = _leaves(OmegaConf.to_container(cfg))
        given = _leaves(OmegaConf.to_container(user))
        clash = sorted(k for k, v in after.items() if before.get(k, _ABSENT) != v and given.get(k, _ABSENT) not in (_ABSENT, v))
        if clash:
            raise ConfigError(f"config key '{clash[0]}' = {given[clash[0]]!r} differs from what the pipeline sets "
                              f"({after[clash[0]]!r}); remove it" + (f" (and {', '.join(clash[1:])})" if clash[1:] else ""))
    except OmegaConfBaseException as e:
        raise explain(schema, e) from None
    return finish_config(schema, cfg)


def user_config_path(name: str) -> str:
    """A `--config` file as given; `configs/X.yaml` that is not there (relative to the working
    directory, e.g. after `pip install .`) is the shipped `CONFIG_DIR/X.yaml`."""
    p = Path(name)
    if not p.is_absolute() and not p.exists() and p.parts[:1] == ("configs",) and (CONFIG_DIR.joinpath(*p.parts[1:])).is_file():
        return str(CONFIG_DIR.joinpath(*p.parts[1:]))
    return name


def config_path(name: str | Path) -> Path:
    """A config file: absolute, or relative to configs/."""
    return Path(name) if Path(name).is_absolute() else CONFIG_DIR / name


def finish_config(schema: type[T], cfg: DictConfig) -> T:
    """A merged OmegaConf tree -> the typed, checked config (missing values, ranges, URLs)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            "missing required config value(s): " + ", ".join(missing) + " (set them as key=value or in --config FILE)"
        )
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise explain(schema, e) from None
    _check_fields(obj)
    return obj  # type: ignore[return-value]


def cli_config(schema: type[T], argv: Sequence[str], defaults: Sequence[str | Path] = (),
               check: Any = None) -> T:
    """`load_config` for a job's command line: a bad config prints `config error: ...` and exits
    with status 2 (before any Ray or GPU resource is touched). `check(cfg)` may raise ConfigError
    (or ValueError) for job-specific rules."""
    try:
        cfg = exit_on_config_error(lambda: load_config(schema, argv, defaults))
    except HelpRequested:
        print(help_text(schema, [*defaults, *help_files(argv)]))
        raise SystemExit(0) from None
    if check is not None:
        exit_on_config_error(lambda: check(cfg))
    return cfg


def exit_on_config_error(fn: Any) -> Any:
    """`fn()`; a ConfigError / ValueError prints one line `config error: ...` and exits with status
    2 (`--debug` on the command line re-raises it with its traceback)."""
    import sys

    try:
        return fn()
    except (ConfigError, ValueError) as e:
        if "--debug" in sys.argv:
            raise
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def redact(data: Any, extra: Sequence[str] = ()) -> Any:
    """Copy of a plain dict/list tree with credential values (and keys named in `extra`) replaced by '***'."""
    if isinstance(data, dict):
        return {
            k: ("***" if (_SECRET.search(str(k)) or str(k) in extra) and v not in (None, "", {}) else redact(v, extra))
            for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return [redact(v, extra) for v in data]
    if isinstance(data, str):
        # credentials embedded in URLs: scheme://user:password@host
        return re.sub(r"(://[^/:@]+:)[^@/]+@", r"\1***@", data)
    return data


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config dataclass (tuples as lists), not redacted."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML with secrets redacted: what is saved beside a run."""
    return yaml.safe_dump(redacted_dict(cfg), sort_keys=False)


def redacted_dict(cfg: Any) -> dict:
    """Plain dict of a config with credentials and the keys named in `logging.redact` hidden."""
    tree = to_dict(cfg)
    return redact(tree, (tree.get("logging") or {}).get("redact") or ())


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


# ---------------------------------------------------------------------------- --help
def _field_comments(cls: type) -> dict[str, str]:
    """field name -> the comment at the end of its line in the class source (the field's doc)."""
    import inspect
    import io
    import tokenize

    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    name_at_line: dict[int, str] = {}
    for i, line in enumerate(src.splitlines(), 1):
        m = re.match(r"^\s{4}(\w+)\s*:", line)
        if m:
            name_at_line[i] = m.group(1)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in name_at_line:
            out[name_at_line[tok.start[0]]] = tok.string.lstrip("#").strip()
    return out


def _type_name(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(t, "__name__", str(t))


def help_text(schema: type, defaults: Sequence[str | Path] = (), job: str = "") -> str:
    """Every key of `schema` grouped by section: type, default (after the job's default YAML files),
    allowed range and the field's description (its comment in the schema source)."""
    cfg = OmegaConf.structured(schema)
    for d in defaults:
        cfg = OmegaConf.merge(cfg, load_yaml(CONFIG_DIR / d if not Path(d).is_absolute() else Path(d)))
    if not job:
        import sys

        job = f"jobs/{Path(sys.argv[0]).name}" if sys.argv and sys.argv[0].endswith(".py") else "jobs/<job>.py"
    lines = [f"usage: python {job} [--config FILE.yaml] [key=value ...] [--dry-run] [--debug]",
             "  key=value overrides (dotted keys), applied after the job's defaults and --config files;",
             "  --dry-run plans every step at its configured size (memory per rank, FLOPs, GPU-hours, wiring",
             "  between steps) and starts nothing; --debug shows tracebacks of config errors.", ""]

    def value(key: str) -> str:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if OmegaConf.is_missing(node, leaf):
            return "(required)"
        v = OmegaConf.select(cfg, key)
        return str(OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)

    def walk(cls: type, prefix: str, title: str) -> None:
        hints = typing.get_type_hints(cls)
        comments = {k: v for base in reversed(cls.__mro__) if dataclasses.is_dataclass(base)
                    for k, v in _field_comments(base).items()}  # inherited fields keep their docs
        rows, subs = [], []
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                subs.append((t, f"{prefix}{f.name}."))
                continue
            desc = comments.get(f.name, "")
            rule = f.metadata.get("range")
            rows.append((f"{prefix}{f.name}", _type_name(t), value(prefix + f.name),
                         " ".join(x for x in ((f"[{rule}]" if rule else ""), desc) if x)))
        if rows:
            doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
            doc = doc.split(". ")[0].rstrip(".")
            lines.append(f"{title}" + (f": {doc}" if doc and not doc.startswith(cls.__name__ + "(") else ""))
            w = max(len(r[0]) for r in rows)
            for key, typ, val, desc in rows:
                lines.append(f"  {key.ljust(w)}  {typ} = {val}" + (f"   # {desc}" if desc else ""))
            lines.append("")
        for t, p in subs:
            walk(t, p, p.rstrip("."))

    walk(schema, "", "top level")
    return "\n".join(lines).rstrip() + "\n"
