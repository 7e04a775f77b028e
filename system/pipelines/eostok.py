"""EOSTok end to end with its baselines and VAπ (../shared/seeds/eostok.txt, vapi.txt): EOSTok joint
training (tokenizer + AR, one run) -> pre-tokenize its codes -> the two-stage baseline (AR sizes
side by side on the frozen codes) -> VAπ post-training of the jointly trained AR -> sample and
evaluate before and after VAπ. jobs/eostok_pipeline.py runs it; everything lands under
<storage_path>/<run_name>/: eostok/, tokens/, baseline-<size>/, vapi/, samples_before/,
eval_before/, samples/, eval/, pipeline.json.

Declared from the existing methods (eostok, ar, vapi) and step kinds alone: nothing under cluster/
knows it."""
from __future__ import annotations

from system.config.pipelines import EOSTOK_SECTION_DEFAULTS, EOSTOK_STEPS, EOSTokPipelineConfig
from system.data.storage import join
from system.pipelines.encode import TokenEncoding
from system.pipelines.steps import EncodeStep, EvaluateStep, Pipeline, SampleStep, Step, TrainStep, check_steps
from system.pipelines.wiring import encode, evaluate_on, export_of, on_images, sample_from, train_in


def wire(cfg: EOSTokPipelineConfig) -> None:
    """EOSTok on the images; its tokenizer's codes to the baseline ARs; its export (tokenizer + AR)
    to VAπ at the tokenizer's resolution; each export sampled and evaluated."""
    steps = check_steps(cfg.steps, EOSTOK_STEPS)
    root = join(cfg.storage_path, cfg.run_name)
    joint = export_of(root, "eostok")
    train_in(cfg.eostok, root, "eostok", cfg.storage)
    on_images(cfg.eostok, cfg)
    encode(cfg.pretokenize, cfg.images, join(root, "tokens"), cfg.storage)
    cfg.pretokenize.export_url = joint
    train_in(cfg.baseline, root, "baseline", cfg.storage)
    cfg.baseline.data.url = cfg.pretokenize.out
    cfg.baseline.method.tokenizer_export = joint
    train_in(cfg.vapi, root, "vapi", cfg.storage)
    on_images(cfg.vapi, cfg)
    cfg.vapi.data.resolution = cfg.eostok.data.resolution
    cfg.vapi.method.export_url = joint
    for sample, ev, export, tag in ((cfg.sample_before, cfg.evaluate_before, joint, "_before"),
                                    (cfg.sample, cfg.evaluate, export_of(root, "vapi"), "")):
        sample_from(sample, export, join(root, f"samples{tag}"), cfg.storage)
        sampled = f"sample{tag}" in steps
        evaluate_on(ev, export, join(root, f"samples{tag}", "samples.npz") if sampled else None, join(root, f"eval{tag}"), cfg)


def build(cfg: EOSTokPipelineConfig, root: str) -> list[Step]:
    sizes = ", ".join(f"{k}: {v.model or cfg.baseline.method.model}" for k, v in cfg.baseline.runs.items())
    make = {
        "eostok": lambda: TrainStep(name="eostok", exp=cfg.eostok, title=f"[{cfg.run_name}] EOSTok done",
                                    describe=f"tokenizer + AR trained jointly -> {join(root, 'eostok')}"),
        "pretokenize": lambda: EncodeStep(name="pretokenize", encoding=TokenEncoding(cfg.pretokenize), needs=("eostok",),
                                          describe=f"{cfg.images} -> {cfg.pretokenize.out}"),
        "baseline": lambda: TrainStep(name="baseline", exp=cfg.baseline, needs=("eostok", "pretokenize"),
                                      describe=f"two-stage baseline ARs ({sizes or cfg.baseline.method.model}) on the "
                                               f"frozen codes -> {join(root, 'baseline-*')}"),
        "vapi": lambda: TrainStep(name="vapi", exp=cfg.vapi, needs=("eostok",), title=f"[{cfg.run_name}] VAπ done",
                                  describe=f"VAπ post-training of the joint AR -> {join(root, 'vapi')}"),
        "sample_before": lambda: SampleStep(name="sample_before", cfg=cfg.sample_before, needs=("eostok",),
                                            describe=f"the joint AR -> {cfg.sample_before.out}"),
        "evaluate_before": lambda: EvaluateStep(name="evaluate_before", cfg=cfg.evaluate_before,
                                                needs=("eostok", "sample_before"), describe=f"-> {cfg.evaluate_before.out}"),
        "sample": lambda: SampleStep(name="sample", cfg=cfg.sample, needs=("vapi",),
                                     describe=f"the post-trained AR -> {cfg.sample.out}"),
        "evaluate": lambda: EvaluateStep(name="evaluate", cfg=cfg.evaluate, needs=("vapi", "sample"),
                                         describe=f"-> {cfg.evaluate.out}"),
    }
    return [make[name]() for name in cfg.steps]


GEN = ("generation/fid", "generation/inception_score", "generation/precision", "generation/recall",
       "reconstruction/psnr", "reconstruction/ar_next_token_accuracy")


def report(state: dict) -> str:
    """Before / after VAπ side by side (the evaluations and VAπ's held-out teacher-forced reward),
    and the joint AR's accuracy next to the two-stage baselines'."""
    s = {name: (e.get("summary") or {}) for name, e in state["steps"].items()}
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    vapi = s.get("vapi", {})
    rows = [("held-out reward (VAπ)", vapi.get("heldout_start"), vapi.get("heldout_end"))]
    rows += [(k, s.get("evaluate_before", {}).get(k), s.get("evaluate", {}).get(k)) for k in GEN]
    lines = ["before / after VAπ (the jointly trained AR, then post-trained):",
             *(f"  {k:<40} {fmt(a):>10} -> {fmt(b)}" for k, a, b in rows if a is not None or b is not None)]
    base = {k.split("/", 1)[0]: v for k, v in s.get("baseline", {}).items() if k.endswith("/acc")}
    if base or "ar_acc" in s.get("eostok", {}):
        lines.append("AR next-token accuracy (training): joint " + fmt(s.get("eostok", {}).get("ar_acc")) + "; two-stage "
                     + ", ".join(f"{k} {fmt(v)}" for k, v in base.items()))
    return "\n".join(lines)


EOSTOK = Pipeline(
    name="eostok", schema=EOSTokPipelineConfig, all_steps=EOSTOK_STEPS, section_defaults=EOSTOK_SECTION_DEFAULTS,
    wire=wire, build=build, report=report, defaults=("experiments/eostok_pipeline.yaml",),
    keys={"eostok": ("psnr", "codebook_usage", "ar_acc", "val_psnr_trained"), "pretokenize": ("views",),
          "vapi": ("heldout_start", "heldout_end"), "sample_before": ("num_images",), "sample": ("num_images",),
          "evaluate_before": ("generation/fid", "reconstruction/psnr"), "evaluate": ("generation/fid", "reconstruction/psnr")})
