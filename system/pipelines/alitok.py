"""AliTok end to end (../shared/seeds/alitok.txt): stage 1 (causal decoder) -> stage 2
(bidirectional decoder on the frozen stage-1 encoder) -> pre-tokenize -> AR -> sample -> evaluate.
jobs/alitok_xl.py runs it; everything lands under <storage_path>/<run_name>/: stage1/, stage2/,
tokens/, ar/, samples/, eval/, pipeline.json. Without stage2 the AR learns and decodes with the
stage-1 tokenizer."""
from __future__ import annotations

from system.config.pipelines import ALITOK_SECTION_DEFAULTS, ALITOK_STEPS, AliTokPipelineConfig
from system.data.storage import join
from system.pipelines.encode import TokenEncoding
from system.pipelines.steps import EncodeStep, EvaluateStep, Pipeline, SampleStep, Step, TrainStep, check_steps
from system.pipelines.wiring import export_of, on_images, tokens_to_ar, train_in


def wire(cfg: AliTokPipelineConfig) -> None:
    """Stage 1 and 2 on the pipeline's images (stage 2 on stage 1's export), the codes of the last
    tokenizer stage to the AR, its export to sampling and evaluation."""
    steps = check_steps(cfg.steps, ALITOK_STEPS)
    root = join(cfg.storage_path, cfg.run_name)
    for name, section in (("stage1", cfg.stage1), ("stage2", cfg.stage2)):
        train_in(section, root, name, cfg.storage)
        on_images(section, cfg)
    cfg.stage2.method.stage1_export = export_of(root, "stage1")
    tokenizer = export_of(root, "stage2" if "stage2" in steps else "stage1")
    tokens_to_ar(cfg, root, steps, tokenizer, cfg.pretokenize, cfg.ar, cfg.sample, cfg.evaluate)


def build(cfg: AliTokPipelineConfig, root: str) -> list[Step]:
    kind = "causal" if cfg.stage1.method.decoder_causal else "bidirectional"
    tok = "stage2" if "stage2" in cfg.steps else "stage1"
    make = {
        "stage1": lambda: TrainStep(name="stage1", exp=cfg.stage1, title=f"[{cfg.run_name}] stage 1 done",
                                    describe=f"{kind}-decoder tokenizer -> {join(root, 'stage1')}"),
        "stage2": lambda: TrainStep(name="stage2", exp=cfg.stage2, needs=("stage1",), title=f"[{cfg.run_name}] stage 2 done",
                                    describe=f"bidirectional decoder on the frozen encoder -> {join(root, 'stage2')}"),
        "pretokenize": lambda: EncodeStep(name="pretokenize", encoding=TokenEncoding(cfg.pretokenize), needs=(tok,),
                                          describe=f"{cfg.images} -> {cfg.pretokenize.out}"),
        "ar": lambda: TrainStep(name="ar", exp=cfg.ar, needs=("pretokenize",), title=f"[{cfg.run_name}] AR done",
                                describe=f"{cfg.ar.method.model} on {cfg.ar.data.url} -> {join(root, 'ar')}"),
        "sample": lambda: SampleStep(name="sample", cfg=cfg.sample, needs=("ar",),
                                     describe=f"{cfg.sample.cfg_schedule} CFG {cfg.sample.cfg_scale} -> {cfg.sample.out}"),
        "evaluate": lambda: EvaluateStep(name="evaluate", cfg=cfg.evaluate, needs=("ar",), describe=f"-> {cfg.evaluate.out}"),
    }
    return [make[name]() for name in cfg.steps]


ALITOK = Pipeline(
    name="alitok", schema=AliTokPipelineConfig, all_steps=ALITOK_STEPS, section_defaults=ALITOK_SECTION_DEFAULTS,
    wire=wire, build=build, defaults=("experiments/alitok_xl.yaml",),
    keys={"stage1": ("psnr", "codebook_usage", "probe/acc", "val_psnr_trained"), "stage2": ("psnr", "val_psnr_trained"),
          "pretokenize": ("views",), "ar": ("loss", "acc"), "sample": ("num_images", "images_per_s"),
          "evaluate": ("generation/fid", "generation/inception_score", "reconstruction/psnr",
                       "reconstruction/ar_next_token_accuracy")})
