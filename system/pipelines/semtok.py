"""SemTok end to end (../shared/seeds/semtok.txt): [vae ->] [latents ->] stage I (flow-matching
decoder) -> stage II (one-step refiner) -> pre-tokenize -> masked AR -> sample -> evaluate.
jobs/semtok.py runs it; everything lands under <storage_path>/<run_name>/: vae/, latents/,
stage1/, stage2/, tokens/, ar/, samples/, eval/, pipeline.json.

The optional `vae` step fits a small SD3.5-shaped VAE (only where SD3.5's cannot be had: the CPU
demo) and hands it to stage I; the optional `latents` step caches every view's VAE latents once
(system/pipelines/encode.py) and both stages train on that cache."""
from __future__ import annotations

from system.config.pipelines import SEMTOK_SECTION_DEFAULTS, SEMTOK_STEPS, SemTokPipelineConfig
from system.data.storage import join
from system.pipelines.encode import LatentEncoding, TokenEncoding
from system.pipelines.steps import EncodeStep, EvaluateStep, Pipeline, SampleStep, Step, TrainStep, check_steps
from system.pipelines.wiring import encode, export_of, on_images, tokens_to_ar, train_in


def wire(cfg: SemTokPipelineConfig) -> None:
    """The image steps on the pipeline's images; stage I on the fitted VAE (with the vae step); the
    latent cache of stage I's VAE at stage I's resolution, read by both stages (with the latents
    step); stage II on stage I's export; the last stage's codes to the masked AR."""
    steps = check_steps(cfg.steps, SEMTOK_STEPS)
    root = join(cfg.storage_path, cfg.run_name)
    for name, section in (("vae", cfg.vae), ("stage1", cfg.stage1), ("stage2", cfg.stage2)):
        train_in(section, root, name, cfg.storage)
        on_images(section, cfg)
    cfg.stage2.method.stage1_export = export_of(root, "stage1")
    if "vae" in steps:  # stage I reads the fitted VAE (and nothing else)
        vae = cfg.stage1.method.vae
        vae.export, vae.path, vae.hub_name, vae.random_init = export_of(root, "vae"), None, None, False
    encode(cfg.latents, cfg.images, join(root, "latents"), cfg.storage)
    cfg.latents.vae = cfg.stage1.method.vae  # the cache of stage I's VAE
    cfg.latents.resolution = cfg.stage1.data.resolution
    if "latents" in steps:  # both stages train on the cache
        cfg.stage1.data.url = cfg.stage2.data.url = cfg.latents.out
    tokenizer = export_of(root, "stage2" if "stage2" in steps else "stage1")
    tokens_to_ar(cfg, root, steps, tokenizer, cfg.pretokenize, cfg.ar, cfg.sample, cfg.evaluate)


def build(cfg: SemTokPipelineConfig, root: str) -> list[Step]:
    tok = "stage2" if "stage2" in cfg.steps else "stage1"
    make = {
        "vae": lambda: TrainStep(name="vae", exp=cfg.vae, title=f"[{cfg.run_name}] VAE done",
                                 describe=f"a small SD3.5-shaped VAE fitted to the images -> {join(root, 'vae')}"),
        "latents": lambda: EncodeStep(name="latents", encoding=LatentEncoding(cfg.latents), needs=("vae",),
                                      describe=f"{cfg.latents.augment} views' VAE latents -> {cfg.latents.out}"),
        "stage1": lambda: TrainStep(name="stage1", exp=cfg.stage1, needs=("vae", "latents"),
                                    title=f"[{cfg.run_name}] stage I done",
                                    describe=f"{cfg.stage1.method.tokenizer} flow-matching tokenizer -> {join(root, 'stage1')}"),
        "stage2": lambda: TrainStep(name="stage2", exp=cfg.stage2, needs=("stage1", "latents"),
                                    title=f"[{cfg.run_name}] stage II done",
                                    describe=f"one-step refiner on the frozen stage I tokens -> {join(root, 'stage2')}"),
        "pretokenize": lambda: EncodeStep(name="pretokenize", encoding=TokenEncoding(cfg.pretokenize), needs=(tok,),
                                          describe=f"{cfg.images} -> {cfg.pretokenize.out}"),
        "ar": lambda: TrainStep(name="ar", exp=cfg.ar, needs=("pretokenize",), title=f"[{cfg.run_name}] AR done",
                                describe=f"masked {cfg.ar.method.model} on {cfg.ar.data.url} -> {join(root, 'ar')}"),
        "sample": lambda: SampleStep(name="sample", cfg=cfg.sample, needs=("ar",),
                                     describe=f"{cfg.sample.cfg_scale} CFG -> {cfg.sample.out}"),
        "evaluate": lambda: EvaluateStep(name="evaluate", cfg=cfg.evaluate, needs=("ar",), describe=f"-> {cfg.evaluate.out}"),
    }
    return [make[name]() for name in cfg.steps]


SEMTOK = Pipeline(
    name="semtok", schema=SemTokPipelineConfig, all_steps=SEMTOK_STEPS, section_defaults=SEMTOK_SECTION_DEFAULTS,
    wire=wire, build=build,
    keys={"vae": ("psnr", "val_psnr_trained"), "latents": ("views", "bytes_per_view"),
          "stage1": ("loss", "bit_usage", "val_psnr_trained"), "stage2": ("psnr", "val_psnr_trained", "val_psnr_stage1"),
          "pretokenize": ("views",), "ar": ("loss", "acc", "bit_acc"), "sample": ("num_images", "images_per_s"),
          "evaluate": ("generation/fid", "generation/inception_score", "reconstruction/psnr", "reconstruction/ssim",
                       "reconstruction/bits_per_pixel", "reconstruction/ar_masked_token_accuracy")})
