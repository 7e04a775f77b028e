"""`--dry-run`: every step of a job or pipeline planned at its configured size before any resource
is taken, no data read beyond local shard indexes, no weights read (system/models/weights.py's plan
mode), and the wiring between steps checked on the way.

Steps are planned in order. Each one's outputs that later steps read (an export's model.json, a
shard set's index.json) are made from its config and added to a `planned_files` overlay, so a
later step reads them as if the earlier one had run: the AR step checks its preset against the
codes the tokenizer steps would write. An image shard set that cannot be read here (object
storage, not made yet) is assumed to be ImageNet-1k (1,281,167 train / 50,000 val images, 1000
classes), and the plan says so.

`check_steps(steps)` is the same walk without the traces: the wiring checks a real run does before
its first step (a few seconds).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import singledispatch
from typing import Any, Optional, Sequence

from system.config import ConfigError
from system.data.storage import join, planned_files, protocol, write_bytes_atomic
from system.pipelines.steps import EncodeStep, EvaluateStep, SampleStep, Step, TrainStep

IMAGENET = {"train": 1_281_167, "val": 50_000}  # images per split of ImageNet-1k
IMAGENET_CLASSES = 1000


@dataclass
class StepPlan:
    """One step's plan: the table's columns (`row`), the full plan (`detail`) and its notes."""

    step: str
    kind: str
    row: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Walk:
    """State of one dry run: the overlay of planned files, the options, what was assumed."""

    files: dict[str, bytes] = field(default_factory=dict)
    trace: bool = True  # trace one step of every phase (False: wiring checks only)
    card: str = "h100"
    mfu: float = 0.4
    assumed: list[str] = field(default_factory=list)
    made: dict[str, list[str]] = field(default_factory=dict)  # step -> the planned files it writes
    made_files: set[str] = field(default_factory=set)


def _index_url(url: str) -> str:
    return join(url, "index.json")


def _split(url: str) -> str:
    return "val" if url.rstrip("/").rsplit("/", 1)[-1].startswith("val") else "train"


def ensure_image_set(url: Optional[str], walk: Walk, storage: Any = None) -> None:
    """An image shard set a step reads: a local index is read as it is; anything else (object
    storage, a folder not made yet) is assumed to be ImageNet-1k's split (recorded in `walk`)."""
    if not url or url.rstrip("/") + "/index.json" in walk.files:
        return
    if protocol(url) == "file" and os.path.exists(_index_url(url).removeprefix("file://")):
        return
    split = _split(url)
    n = IMAGENET[split]
    index = {"version": 1, "shards": [], "planned": True, "num_samples": n, "split": split, "assumed": "ImageNet-1k",
             "classes": {f"n{i:08d}": i for i in range(IMAGENET_CLASSES)}}
    walk.files[_index_url(url).rstrip("/")] = json.dumps(index).encode()
    walk.assumed.append(f"{url}: not read here; assumed ImageNet-1k {split} ({n:,} images, {IMAGENET_CLASSES} classes)")


def _section_error(step: Step, e: BaseException) -> ConfigError:
    """A step's config error with the section it is in and the steps its inputs come from."""
    msg = str(e).replace("config key '", f"config key '{step.name}.")
    if step.needs:
        msg += f" (step {step.name!r} reads what step(s) {', '.join(step.needs)} make)"
    return ConfigError(f"step {step.name}: {msg}")


def plan_steps(steps: Sequence[Step], walk: Optional[Walk] = None) -> list[StepPlan]:
    """Plan (or, with `walk.trace=False`, only check) `steps` in order (module doc). A config or
    wiring error is a ConfigError naming the step, its key, and the steps its inputs come from."""
    walk = walk or Walk()
    out = []
    with planned_files(walk.files), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "built with RANDOM weights": placeholders are the point here
        for step in steps:
            t0 = time.perf_counter()
            try:
                plans = plan_step(step, walk)
            except ValueError as e:  # ConfigError, or a method's own check (ValueError naming the key)
                raise _section_error(step, e) from None
            plans = plans if isinstance(plans, list) else [plans]
            for p in plans:
                p.row["plan_s"] = round((time.perf_counter() - t0) / len(plans), 1)
                p.notes = [_made_by(n, walk) for n in p.notes]
            out.extend(plans)
            walk.made[step.name] = sorted(set(walk.files) - set(walk.made_files))
            walk.made_files.update(walk.files)
    return out


def _made_by(note: str, walk: Walk) -> str:
    """A note on weights at a place an earlier step of this run writes says so (not "missing")."""
    for name, files in walk.made.items():
        if any(note.endswith(f"at {f.rsplit('/', 1)[0]} (missing here)") for f in files):
            return note.replace("(missing here)", f"(made by step {name})")
    return note


def check_steps(steps: Sequence[Step]) -> None:
    """The wiring checks of a real run before its first step (`plan_steps` without traces)."""
    plan_steps(steps, Walk(trace=False))


# --------------------------------------------------------------------------- one step, by kind
@singledispatch
def plan_step(step: Step, walk: Walk) -> StepPlan | list[StepPlan]:
    raise TypeError(f"no plan for a {type(step).__name__} (step {step.name!r})")


def _model_json(arts: dict) -> bytes:
    from system.models.artifacts import model_json_bytes

    return model_json_bytes(arts)


@plan_step.register
def _(step: TrainStep, walk: Walk) -> StepPlan:
    from system.config.runs import typed_runs

    plans = []
    for name, exp in typed_runs(step.exp).items():
        if isinstance(exp, BaseException):
            raise exp
        plans.append(plan_run(exp, walk))
    if len(plans) == 1:
        plans[0].step = step.name
    return plans  # side-by-side runs: one row each (<run_name>-<key>)


def plan_run(exp: Any, walk: Walk) -> StepPlan:
    """One training run: its data checked and described, its method's checks, its export's
    model.json added to the overlay, and (with `walk.trace`) the traced plan."""
    from system.methods import registry
    from system.models import weights
    from system.plan.trace import build_fake, fake_build

    entry = registry.for_config(exp.method)
    d = exp.data
    if hasattr(d, "resolution"):  # images (or a latent cache of them), also VAπ's; token sets are made by a step
        for url in (d.url, d.val_url):
            ensure_image_set(url, walk, d.storage)
    with weights.planning(unset_raises=not walk.trace) as refs:  # a real run's checks: unset weights are errors
        entry.source.check(exp)
        data = entry.source.resolve(exp)
        entry.method.check(exp.method, data)
        fm = build_fake(entry.method, exp.method, data, int(exp.cluster.num_workers))
        with fm.mode, fake_build():
            arts = fm.method.artifacts({n: s.module for n, s in fm.specs.items()}) if exp.checkpoint.export else {}
    export = join(exp.checkpoint.storage_path, exp.run_name, "export")
    if arts:
        walk.files[join(export, "model.json")] = _model_json(arts)
    p = StepPlan(exp.run_name, "train", notes=[])
    p.detail["export_parts"] = {n: a.kind for n, a in arts.items()}
    p.detail["weights"] = [r.as_dict() for r in refs]
    if not walk.trace:
        return p
    return plan_trained(exp, data, walk, p)


def plan_trained(exp: Any, data: Any, walk: Walk, p: Optional[StepPlan] = None) -> StepPlan:
    """The traced plan of training `exp` on `data` (a DataSpec) as a row of the table."""
    from system.plan.train import plan_training

    p = p or StepPlan(exp.run_name, "train", notes=[])
    tp = plan_training(exp, data, card=walk.card, mfu=walk.mfu)
    p.detail.update(tp.as_dict())
    gb = tp.memory.as_gb()
    fit = dict(zip(("h100", "h200"), tp.fits))
    p.row = {
        "method": tp.method, "params": tp.params_trainable, "frozen": tp.params_frozen, "ranks": tp.world_size,
        "zero": tp.zero_stage, "micro": tp.micro_batch, "gb_rank": gb["total"],
        **{f"fits_{k}": ("yes" if f.fits else "NO") + f" ({f.headroom_gb:+.0f} GB)" for k, f in fit.items()},
        "tflop_step": tp.flops_per_step / 1e12, "s_step": tp.step_seconds, "steps": tp.max_steps,
        "gpu_h": tp.gpu_hours, "wall_h": tp.wall_hours, "ckpt_gb": tp.checkpoint_bytes / 2**30}
    missing = [w for w in p.detail.get("weights", []) if w.get("exists") is False]
    p.notes += [f"weights: {w['what']} at {w['where']} (missing here)" for w in missing]
    p.notes += [f"does not fit {tp.card}: try {s.setting} ({s.total_gb:.1f} GB/rank{'' if s.fits else ', still too much'})"
                for s in tp.suggestions]
    return p


@plan_step.register
def _(step: EncodeStep, walk: Walk) -> StepPlan:
    from system.models import weights

    from system.plan.trace import fake_build, fake_mode

    enc = step.encoding
    ensure_image_set(enc.cfg.src, walk, enc.cfg.storage)
    with weights.planning() as refs, fake_mode(), fake_build():  # the encoder's architecture, never its values
        enc.prepare()
    views = _views(enc)
    index = {"version": 1, "shards": [], "planned": True, "num_samples": views, "classes": enc.index["classes"],
             **_section(enc)}
    walk.files[_index_url(enc.cfg.out).rstrip("/")] = json.dumps(index).encode()
    per_view = view_bytes(enc)
    total = per_view * views
    p = StepPlan(step.name, "encode", row={"method": enc.title, "views": views, "shards_gb": total / 2**30},
                 detail={"views": views, "bytes_per_view": per_view, "bytes": total, "out": enc.cfg.out,
                         "meta": _section(enc), "weights": [r.as_dict() for r in refs]})
    return p


def _section(enc: Any) -> dict:
    key = "tokens" if enc.title == "pretokenize" else "latents"
    return {key: enc.meta}


def _views(enc: Any) -> int:
    from system.data.tokens import AUGMENTATIONS

    return int(enc.index["num_samples"]) * AUGMENTATIONS[enc.cfg.augment]


def _tar_member(size: int) -> int:
    return 512 + math.ceil(size / 512) * 512


def view_bytes(enc: Any) -> int:
    """Bytes one view takes in an output shard (its tar members with their headers): exact for
    token shards; for a latent cache the float16 latents plus the view's PNG pixels, estimated at
    half the raw RGB bytes (photographs compress about 2:1 losslessly)."""
    if "seq_len" in enc.meta:
        from system.data.tokens import encode_token_sample, meta_dtype

        import numpy as np

        fields = encode_token_sample(np.zeros(enc.meta["seq_len"], dtype=meta_dtype(enc.meta)), 0, 0, meta_dtype(enc.meta))
        return sum(_tar_member(len(v)) for v in fields.values())
    m = enc.meta
    latents = m["channels"] * m["size"] ** 2 * 2
    pixels = 3 * m["resolution"] ** 2 // 2
    return _tar_member(latents) + _tar_member(pixels) + 2 * _tar_member(8)


@plan_step.register
def _(step: SampleStep, walk: Walk) -> StepPlan:
    from system.config.eval_schema import check_sample_config
    from system.models.artifacts import model_part
    from system.plan.decode import plan_sampling

    cfg = step.cfg
    check_sample_config(cfg)
    walk.files[join(cfg.out, "samples.npz")] = b""
    p = StepPlan(step.name, "sample")
    try:
        part = model_part(cfg.export_url, "ar", cfg.storage)
    except (FileNotFoundError, KeyError) as e:
        raise ConfigError(f"config key 'export_url' = {cfg.export_url!r}: {e}") from None
    if not walk.trace:
        return p
    from system.models.artifacts import config_from_dict
    from system.models.gpt import GPTConfig

    gpt = config_from_dict(GPTConfig, part["config"], "generator")
    dp = plan_sampling(gpt, cfg.batch_size, cfg.cfg_scale, precision="bf16" if cfg.precision == "bf16" else "fp32",
                       card=walk.card)
    images = cfg.num_per_class * (cfg.num_classes or gpt.num_classes)
    p.detail.update(dp.as_dict(), images=images)
    per_image = dp.seconds_per_image
    p.row = {"method": f"sample ({dp.kind})", "images": images, "micro": cfg.batch_size, "gb_rank": dp.total_bytes / 2**30,
             **{f"fits_{k}": ("yes" if f.fits else "NO") + f" ({f.headroom_gb:+.0f} GB)" for k, f in zip(("h100", "h200"), dp.fits)},
             "gpu_h": per_image * images / 3600}
    return p


@plan_step.register
def _(step: EvaluateStep, walk: Walk) -> StepPlan:
    from system.config.eval_schema import check_evaluate_config

    cfg = step.cfg
    check_evaluate_config(cfg)
    ensure_image_set(cfg.shards, walk, cfg.storage)
    walk.files[join(cfg.out, "report.json")] = b"{}"
    return StepPlan(step.name, "evaluate", row={"method": "evaluate"})


# --------------------------------------------------------------------------- output
COLUMNS = [("step", "step", "{}"), ("method", "what", "{}"), ("params", "params", "{:.3g}"),
           ("frozen", "frozen", "{:.3g}"), ("ranks", "ranks", "{}"), ("zero", "ZeRO", "{}"), ("micro", "batch/rank", "{}"),
           ("gb_rank", "GB/rank", "{:.1f}"), ("fits_h100", "H100 80GB", "{}"), ("fits_h200", "H200 141GB", "{}"),
           ("tflop_step", "TFLOP/step", "{:.3g}"), ("s_step", "s/step", "{:.3g}"), ("steps", "steps", "{}"),
           ("gpu_h", "GPU-h", "{:.3g}"), ("wall_h", "wall h", "{:.3g}"), ("ckpt_gb", "ckpt GB", "{:.2g}"),
           ("views", "views", "{:,}"), ("shards_gb", "shards GB", "{:.3g}"), ("images", "images", "{:,}"),
           ("plan_s", "plan s", "{}")]


def plan_table(title: str, plans: Sequence[StepPlan], walk: Walk) -> str:
    """The plans as a text table (columns any step fills), then the notes and assumptions."""
    rows = [{"step": p.step, **p.row} for p in plans]
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([(f.format(r[k]) if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                       else str(r.get(k, ""))) for k, _, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [title, *("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)]
    lines += [f"  time at MFU {walk.mfu:g} on {walk.card}; memory per rank under the configured ZeRO stage and world size"]
    lines += [f"  note [{p.step}]: {n}" for p in plans for n in p.notes]
    lines += [f"  assumed: {a}" for a in walk.assumed]
    return "\n".join(lines)


def plan_json(plans: Sequence[StepPlan], walk: Walk) -> bytes:
    return json.dumps({"card": walk.card, "mfu": walk.mfu, "assumed": walk.assumed,
                       "steps": [asdict(p) for p in plans]}, indent=1, default=str).encode()


def run_dry(title: str, steps: Sequence[Step], out: str, storage: Any = None, walk: Optional[Walk] = None) -> list[StepPlan]:
    """A job's `--dry-run`: plan `steps`, print the table, write `<out>/plan.json` (beside the run;
    when that place cannot be written, `./plan-<name>.json`); returns the plans."""
    import sys

    walk = walk or Walk()
    plans = plan_steps(steps, walk)
    print(plan_table(f"{title}: dry run ({len(plans)} step(s); nothing started, no weights read)", plans, walk))
    data = plan_json(plans, walk)
    url = join(out, "plan.json")
    try:
        write_bytes_atomic(url, data, storage)
    except Exception as e:  # noqa: BLE001 - the plan is still worth having: keep it here
        url = os.path.abspath(f"plan-{out.rstrip('/').rsplit('/', 1)[-1]}.json")
        with open(url, "wb") as f:
            f.write(data)
        print(f"  ({type(e).__name__}: {e}; plan written here instead)", file=sys.stderr)
    print(f"  plan: {url}")
    return plans
