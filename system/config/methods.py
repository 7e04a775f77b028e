"""Each method's own config dataclass (its section `method:` of a job's config): loss weights,
model sizes (registry names), module optimiser settings, frozen helpers. Pure dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from system.config.ranges import ok

TeacherKind = Literal["dinov2", "siglip"]


@dataclass
class TeacherConfig:
    """A frozen vision teacher (system.losses.teachers): DINOv2 for EOSTok, SigLIP for SemTok."""

    kind: TeacherKind = "dinov2"
    path: Optional[str] = None  # local from_pretrained directory
    hub_name: Optional[str] = None  # e.g. facebook/dinov2-base, google/siglip-so400m-patch14-384
    image_size: Optional[int] = field(default=None, metadata=ok(">= 14"))  # teacher input size; None = the checkpoint's own
    random_init: bool = False  # build the architecture with random weights (tests only)
    tiny: bool = False  # with random_init: a 2-layer width-32 model for fast tests


@dataclass
class LPIPSConfig:
    vgg_path: Optional[str] = None  # torchvision vgg16 state dict
    lin_path: Optional[str] = None  # LPIPS v0.1 vgg.pth linear heads
    random_init: bool = False  # allowed only when no paths are given (demo/tests)


@dataclass
class ConvNeXtNetConfig:
    """The frozen ConvNeXt of AliTok's ConvNeXt-S perceptual term (system/losses/convnext_perceptual.py)."""

    # local weights: torchvision's convnext_small-0c510722.pth (the official ones), a transformers state dict
    # (.pt/.safetensors) or a save_pretrained folder (e.g. facebook/convnext-small-224)
    path: Optional[str] = None
    random_init: bool = False  # allowed only when no path is given (demo/tests)
    size: Literal["small", "debug"] = "small"  # debug: a tiny random net for tests


@dataclass
class ResNetNetConfig:
    """The frozen ResNet-50 of SemTok stage II's ResNet logit perceptual term (system/losses/resnet_perceptual.py)."""

    # local weights in transformers' layout: a save_pretrained folder (e.g. microsoft/resnet-50) or a
    # .pt/.pth/.safetensors state dict (resnet.*, classifier.1.*); torchvision's resnet50 keys are not converted
    path: Optional[str] = None
    random_init: bool = False  # allowed only when no path is given (demo/tests)
    size: Literal["50", "debug"] = "50"  # debug: a tiny random net for tests


@dataclass
class ModelConfig:
    """Sizes come from registries with exact names; `*_overrides` change single fields."""

    tokenizer: str = "eostok-tok"
    tokenizer_overrides: dict[str, Any] = field(default_factory=dict)
    ar: str = "eostok-h"
    ar_overrides: dict[str, Any] = field(default_factory=dict)
    # EOSTok's differentiable AR input h = Ind^T (straight-through one-hot Ind, (L, K)) times:
    # "table": the AR's own full-rank table E (K, dim), the paper's h = Ind^T E (NTP reaches the encoder
    # through Ind; the published 93 / 312 / 644M need it: S/L/H count 92.0 / 311.4 / 641.0M);
    # "codebook": the tokenizer's codebook (K, 64) then a linear map to the AR width (rank 64; NTP
    # reaches encoder and codebook; 88.9 / 307.3 / 635.8M). Only the table that is read is built and counted.
    ar_input: Literal["codebook", "table"] = "table"
    attn_backend: Literal["auto", "flash", "sdpa", "math"] = "auto"
    grad_checkpointing: bool = False


@dataclass
class EOSTokConfig:
    """EOSTok's end-to-end objective (../shared/seeds/eostok.txt). A weight of 0 switches a term
    off, so the paper's ablation rows (two-stage baseline, NTP only, + APR, alignment) are configs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    l1: float = field(default=0.0, metadata=ok(">= 0"))
    l2: float = field(default=1.0, metadata=ok(">= 0"))
    lpips: float = field(default=1.0, metadata=ok(">= 0"))
    gan: float = field(default=0.1, metadata=ok(">= 0"))
    gan_start_step: int = field(default=0, metadata=ok(">= 0"))
    adaptive_gan_weight: bool = False
    lecam: float = field(default=0.05, metadata=ok(">= 0"))
    # commitment / entropy weights live in the tokenizer's quantizer config
    # (method.model.tokenizer_overrides={quantizer: {commit_weight: ..., entropy_weight: ...}})
    ntp: float = field(default=0.1, metadata=ok(">= 0"))
    ntp_label_smoothing: float = field(default=0.0, metadata=ok("in [0, 1)"))
    apr_l2: float = field(default=1.0, metadata=ok(">= 0"))
    apr_lpips: float = field(default=1.0, metadata=ok(">= 0"))
    align: float = field(default=0.5, metadata=ok(">= 0"))  # weight of the encoder's alignment to teacher features
    # what `align` pulls to the teacher: "patches": the encoder's 2D hidden patch states after block
    # `align_layer` (implicit alignment, the paper's); "latents": the 1D latents z (direct alignment,
    # latent i to teacher patch i in raster order, teacher pooled to L tokens when L != N)
    align_target: Literal["patches", "latents"] = "patches"
    align_layer: Optional[int] = None  # encoder block (0-based, -1 = last) for "patches"; None: the middle, enc_depth // 2 - 1
    substitute_patches: bool = False  # direct substitution: teacher features (projected) replace the patch embeddings
    repa: float = field(default=0.0, metadata=ok(">= 0"))  # REPA-style decoder alignment
    repa_layer: int = field(default=1, metadata=ok(">= 0"))
    detach_ar_input: bool = False  # True: two-stage baseline (no NTP gradient into the tokenizer: Ind and codebook detached)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lpips_net: LPIPSConfig = field(default_factory=LPIPSConfig)
    ema_decay: float = field(default=0.9999, metadata=ok("in [0, 1)"))  # EMA of the generator (tokenizer + AR); 0: none
    disc_lr: float = field(default=1e-4, metadata=ok("> 0"))  # the discriminator's own AdamW settings (the generator uses optim.*)
    disc_betas: tuple[float, float] = (0.5, 0.9)
    sample_cfg_scale: float = field(default=2.0, metadata=ok(">= 0"))
    sample_temperature: float = field(default=1.0, metadata=ok("> 0"))


@dataclass
class AliTokLossConfig:
    """The reconstruction objective both AliTok tokenizer stages share, at the official code's values
    (github.com/ali-vilab/alitok train_tokenizer/: config.py, loss/mse_lpips_gan.py, README_AliTok.md;
    the paper gives only L_mse + L_perc + L_quant + 0.1 L_adv): MSE on [0, 1] images + ConvNeXt-S
    perceptual + LPIPS for the first `lpips_until_step` steps + the quantizer's terms + a PatchGAN
    hinge from `gan_start_step`, no LeCam. A weight of 0 switches a term off."""

    l2: float = field(default=1.0, metadata=ok(">= 0"))  # MSE of images in [0, 1] (official reconstruction_weight 1)
    # LPIPS only early (official README ①: --lpips_weight 1.0 for ~50k steps "until the reconstructed images
    # appear normal", then removed): weight `lpips` before `lpips_until_step`, 0 after (None: throughout)
    lpips: float = field(default=1.0, metadata=ok(">= 0"))
    lpips_until_step: Optional[int] = field(default=50000, metadata=ok(">= 0"))
    # ConvNeXt-S perceptual term (MSE of the ImageNet logits at 224 px; official config.py perceptual_weight 1; 0: off),
    # at `convnext_with_lpips` while LPIPS is on (official ①: --perceptual_weight 0.1; None: `convnext` throughout)
    convnext: float = field(default=1.0, metadata=ok(">= 0"))
    convnext_with_lpips: Optional[float] = field(default=0.1, metadata=ok(">= 0"))
    # the generator's hinge term: official discriminator_factor 0.1 (the paper's lambda) x discriminator_weight 0.05
    gan: float = field(default=0.005, metadata=ok(">= 0"))
    gan_start_step: int = field(default=0, metadata=ok(">= 0"))  # official: the GAN in each stage's last ~100k steps (README ③)
    lecam: float = field(default=0.0, metadata=ok(">= 0"))  # LeCam on the discriminator (official: 0)
    lpips_net: LPIPSConfig = field(default_factory=LPIPSConfig)
    convnext_net: ConvNeXtNetConfig = field(default_factory=ConvNeXtNetConfig)
    ema_decay: float = field(default=0.0, metadata=ok("in [0, 1)"))  # EMA of the trained tokenizer part (exported as tokenizer_ema); 0: none (official)
    disc_lr: float = field(default=1e-4, metadata=ok("> 0"))  # the discriminator's own AdamW (official: the generator's lr)
    disc_betas: tuple[float, float] = (0.9, 0.999)  # official: AdamW defaults
    attn_backend: Literal["auto", "flash", "sdpa", "math"] = "auto"
    grad_checkpointing: bool = False


@dataclass
class AliTokStage1Config(AliTokLossConfig):
    """AliTok stage 1: bidirectional ViT encoder, VQ with the official clustering re-initialisation
    (the preset's quantizer.cluster_decay), causal decoder with prefix tokens and the prefix aux loss."""

    # preset (system/models/tokenizer1d.py): alitok-tok-code (17 prefix; stage 2: 32 buffers, the prefix read),
    # alitok-tok-paper (16; stage 2: 64 buffers, the prefix dropped); both with the official decoder layout
    # (decoder_layout=latents; ours: tokenizer_overrides.decoder_layout=mask_tokens); debug-tiny-alitok, debug-tiny-causal
    tokenizer: str = "alitok-tok-code"
    tokenizer_overrides: dict[str, Any] = field(default_factory=dict)  # single Tokenizer1DConfig fields, e.g. {num_prefix_tokens: 8, quantizer: {codebook_size: 256}}
    # the prefix aux loss (system/methods/alitok.py): l2 x MSE of the patches the prefix tokens decode (the first
    # row, and its first patches when there are more prefix tokens than a row) x aux x num_prefix_tokens / num_patches
    # (official: x10 x 17/256) + the perceptual terms (at their weights of the step) of the full image with that
    # row (other rows detached) x aux (the paper's; the official code's aux loss is the MSE alone)
    aux: float = field(default=10.0, metadata=ok(">= 0"))  # prefix aux loss weight (official 10)
    # False: a bidirectional decoder in stage 1, the paper's ablation baseline (A) (set aux=0 and
    # tokenizer_overrides.num_prefix_tokens=0 with it, as (A) has neither)
    decoder_causal: bool = True
    # AR-predictability probe: a small AR model (module "probe", phase "probe") trained on the current codes,
    # detached; it logs its next-token accuracy (probe/acc: the paper's "AR training accuracy", online)
    probe: Optional[str] = None  # GPT preset of the probe (e.g. debug-tiny; sequence/vocab/classes follow the tokenizer); None: off
    probe_overrides: dict[str, Any] = field(default_factory=dict)  # single GPTConfig fields of the probe, e.g. {n_layer: 4, dim: 256}
    probe_lr: Optional[float] = field(default=None, metadata=ok("> 0"))  # the probe's AdamW lr; None: optim.lr


@dataclass
class AliTokStage2Config(AliTokLossConfig):
    """AliTok stage 2: the stage-1 encoder, quantizer and latent queries frozen (loaded from its
    export), a fresh bidirectional decoder with buffer tokens (reading the prefix codes or not: the
    preset's choice) trained with the same reconstruction losses; exported as one tokenizer1d part."""

    stage1_export: str = "runs/alitok-stage1/export"  # the stage-1 run's export/ folder (local or s3://)
    stage1_part: str = "tokenizer"  # its part holding the tokenizer
    stage1_ema: bool = True  # read the stage-1 EMA weights when the export has them
    # decoder fields of the stage-2 tokenizer (dec_width, dec_depth, dec_heads, num_buffer_tokens, decoder_reads_prefix,
    # decoder_layout); the rest comes from the stage-1 tokenizer (the preset's: alitok-tok-code 32 buffer tokens and
    # the prefix read, as the code; alitok-tok-paper 64 and the prefix dropped, as the paper)
    decoder_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {num_buffer_tokens: 64, decoder_reads_prefix: false}


@dataclass
class LatentVAEConfig:
    """The frozen image VAE of SemTok (system/models/vae.py): diffusers' AutoencoderKL with the SD3.5
    VAE's config (f = 8, 16 channels, its scaling and shift factors). Weights from exactly one of:
    `export` (a latent_vae run's export: the demo's own small VAE), `path` (a local save_pretrained
    folder or a diffusers pipeline folder with vae/), `hub_name` (needs internet), `random_init` (tests)."""

    export: Optional[str] = None  # a `latent_vae` run's export/ folder (part "vae")
    path: Optional[str] = None  # e.g. a local copy of stabilityai/stable-diffusion-3.5-medium (its vae/ subfolder is used)
    hub_name: Optional[str] = None  # e.g. stabilityai/stable-diffusion-3.5-medium
    random_init: bool = False  # build the architecture with random weights (tests only)
    tiny: bool = False  # with random_init: the small f = 8, 16-channel architecture of the demo
    sample: bool = False  # encode with a posterior sample (True) or its mean (False)
    scaling_factor: Optional[float] = None  # None: the checkpoint's (SD3.5: 1.5305)
    shift_factor: Optional[float] = None  # None: the checkpoint's (SD3.5: 0.0609)


@dataclass
class LatentVAETrainConfig:
    """`latent_vae`: fits a small SD3.5-shaped AutoencoderKL (f = 8, 16 latent channels) to the data,
    for where no pretrained SD3.5 VAE can be had (the CPU demo, no downloads). The paper uses the
    pretrained SD3.5 VAE: on a cluster set the SemTok stages' method.vae.path instead."""

    tiny: bool = True  # the small architecture (False: the full SD3.5 VAE shape, trained from scratch)
    l2: float = field(default=1.0, metadata=ok(">= 0"))
    l1: float = field(default=0.0, metadata=ok(">= 0"))
    kl: float = field(default=1.0e-6, metadata=ok(">= 0"))  # KL to N(0, I) of the posterior (SD VAEs: about 1e-6)
    ema_decay: float = field(default=0.0, metadata=ok("in [0, 1)"))
    stats_decay: float = field(default=0.99, metadata=ok("in [0, 1)"))  # EMA of the latents' mean / std -> the exported shift and scaling factors


@dataclass
class SemTokStage1Config:
    """SemTok stage I, generative pre-training (../shared/seeds/semtok.txt Eq. 5-6): VAE latents ->
    MMDiT encoder (2D stream + K learnable 1D tokens) -> BSQ -> MMDiT decoder trained by flow matching
    (x_t = t eps + (1 - t) x, loss ||x - eps - D(x_t, q(z), t)||^2), jointly with the entropy term
    (weight quant) and the semantic alignment to SigLIP (weight semantic: distillation of the 2D
    stream + contrastive of the pooled quantized 1D tokens, negatives from every rank)."""

    tokenizer: str = "semtok-18"  # preset (system/models/semtok.py): semtok-18, semtok-32, semtok-tiny
    tokenizer_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {bits: 32, num_tokens: 128, encoder: {depth: 4}, decoder: {depth: 12}}
    vae: LatentVAEConfig = field(default_factory=LatentVAEConfig)
    # SD3.5's transformer (a local save_pretrained folder or a pipeline folder with transformer/) initialises the
    # decoder (paper); every tensor of matching name and shape is copied (not the text projections). "random": an
    # explicit random init (said in the run's log). None: a config error for the paper presets (semtok-18/32), whose
    # 2.2B decoder the paper initialises from SD3.5; the random init of a smaller preset (semtok-tiny)
    decoder_init: Optional[str] = None
    teacher: Optional[TeacherConfig] = field(default_factory=lambda: TeacherConfig(kind="siglip"))  # None: no semantic term
    quant: float = field(default=0.0025, metadata=ok(">= 0"))  # lambda_q: BSQ entropy loss E[H(q(z))] - H(E[q(z)]), the batch term over all ranks
    commit: float = field(default=0.0, metadata=ok(">= 0"))  # BSQ commitment ||u - q(u)||^2 (not in the paper: 0)
    bsq_inv_temperature: float = field(default=100.0, metadata=ok("> 0"))  # BSQ soft assignment of the entropy term
    # bits per group of the entropy term's codebook part: g > 1 = the exact entropy of each group's 2^g sub-codes (BSQ's
    # grouping: 18 bits = 2 x 512 sub-codes); 1 = the per-bit factorisation, blind to bits that flip together (it
    # collapsed the tiny demo's codes to 145 distinct at quant 0.05; README "SemTok" has the ablation)
    entropy_group: int = field(default=9, metadata=ok(">= 1"))
    semantic: float = field(default=0.05, metadata=ok(">= 0"))  # lambda_s of L_sem = L_contra + L_distill
    distill: float = field(default=1.0, metadata=ok(">= 0"))  # weight of L_distill inside L_sem
    contrastive: float = field(default=1.0, metadata=ok(">= 0"))  # weight of L_contra inside L_sem
    contrastive_temperature: float = field(default=0.07, metadata=ok("> 0"))  # logits v.u / T (the paper's t = 1/T, value not published)
    proj_hidden: int = field(default=2048, metadata=ok(">= 1"))  # hidden width of the projections w_x, w_z
    sample_steps: int = field(default=25, metadata=ok(">= 1"))  # Euler steps of the flow sampler (paper: 25) for validation, grids, the export
    ema_decay: float = field(default=0.9999, metadata=ok("in [0, 1)"))  # paper 0.9999 (exported as tokenizer_ema)
    grad_checkpointing: bool = False


@dataclass
class SemTokStage2Config:
    """SemTok stage II, refinement-oriented fine-tuning (Eq. 7): the decoder's noise stream becomes
    learnable mask latents and one decoder step (t = 1) gives the latents -> frozen VAE decoder ->
    l2 MSE + LPIPS x lpips + ResNet logits x resnet + PatchGAN x gan (from gan_start_step). The
    stage I encoder and quantizer are frozen helpers (the tokens, hence the AR's data, stay stage
    I's); decoder initialised from stage I (its EMA when exported), mask latents from 0 (the mean
    of the noise it replaces)."""

    stage1_export: str = "runs/semtok-stage1/export"  # the stage I run's export/ folder (local or s3://)
    stage1_part: str = "tokenizer"
    stage1_ema: bool = True  # read the stage I EMA weights when the export has them
    l2: float = field(default=1.0, metadata=ok(">= 0"))
    lpips: float = field(default=0.1, metadata=ok(">= 0"))  # lambda_p x LPIPS (L_per = LPIPS + ResNet)
    resnet: float = field(default=0.1, metadata=ok(">= 0"))  # lambda_p x ResNet-50 logit MSE
    gan: float = field(default=0.1, metadata=ok(">= 0"))  # lambda_G
    gan_start_step: int = field(default=20000, metadata=ok(">= 0"))  # paper: after 20k iterations
    lecam: float = field(default=0.0, metadata=ok(">= 0"))
    lpips_net: LPIPSConfig = field(default_factory=LPIPSConfig)
    resnet_net: ResNetNetConfig = field(default_factory=ResNetNetConfig)
    ema_decay: float = field(default=0.9999, metadata=ok("in [0, 1)"))
    disc_lr: float = field(default=1e-4, metadata=ok("> 0"))  # paper: discriminator lr 1e-4
    disc_betas: tuple[float, float] = (0.9, 0.999)
    grad_checkpointing: bool = False


@dataclass
class VapiConfig:
    """VAπ post-training (../shared/seeds/vapi.txt, ../shared/REFERENCE.md "VAπ"): group 8, clip
    0.2, adv clip 5, beta 0.1, update in train mode, group-std epsilon 1e-8 as the official code."""

    export_url: Optional[str] = "runs/eostok-h/export"  # a run's export/ folder (ours): jobs/eostok_h.py's default run
    llamagen_gpt: Optional[str] = None  # LlamaGen c2i_*.pt (then set export_url=null)
    llamagen_vq: Optional[str] = None  # LlamaGen vq_ds16_c2i.pt
    llamagen_preset: Optional[str] = None  # GPT size (llamagen-b ... llamagen-3b); null: inferred from the weights
    gpt_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {block_size: 576} for 384px
    group_size: int = field(default=8, metadata=ok(">= 2"))
    noise_p: float = field(default=0.0, metadata=ok("in [0, 1]"))  # contextual noise (code default 0.5, off in the shipped script)
    temperature: float = field(default=1.0, metadata=ok("> 0"))  # sampling temperature; old and new log-probs both use logits / T
    # "train": the update sees dropout and class dropout (official; ratios != 1, the clip is active
    # on-policy); "eval": deterministic update (on-policy ratios exactly 1, the clip acts only off-policy)
    update_mode: Literal["train", "eval"] = "train"
    w_mse: float = field(default=1.0, metadata=ok(">= 0"))
    w_lpips: float = field(default=1.0, metadata=ok(">= 0"))
    clip_eps: float = field(default=0.2, metadata=ok("> 0"))
    adv_clip: float = field(default=5.0, metadata=ok("> 0"))
    adv_eps: float = field(default=1e-8, metadata=ok("> 0"))  # group-std epsilon (official 1e-8)
    beta: float = field(default=0.1, metadata=ok(">= 0"))  # prior regulariser (CE on ground-truth tokens)
    kl: float = field(default=0.0, metadata=ok(">= 0"))  # KL to the frozen initial policy (0: off)
    lpips_net: LPIPSConfig = field(default_factory=LPIPSConfig)
    num_rollout_workers: int = field(default=2, metadata=ok(">= 1"))
    cpus_per_rollout_worker: float = field(default=1.0, metadata=ok("> 0"))
    gpus_per_rollout_worker: float = field(default=0.0, metadata=ok(">= 0"))
    rollout_max_restarts: int = field(default=3, metadata=ok(">= 0"))
    off_policy: bool = False  # one-step off-policy: rollouts of k+1 overlap the update of k
    heldout_images: int = field(default=8, metadata=ok(">= 0"))  # held-out images for the teacher-forced reward check (0: off)
    crash_rollout_at_call: Optional[int] = field(default=None, metadata=ok(">= 1"))  # fault injection: a rollout actor dies at this call (once)


@dataclass
class ARConfig:
    """Next-token AR training on token shards (LlamaGen, AliTok, EOSTok's AR; jobs/train_ar.py).
    vocab_size, block_size (seq_len - prefix_tokens) and num_classes come from the token index."""

    model: str = "llamagen-b"  # GPT size preset (system/models/registry.py): llamagen-*, alitok-*, eostok-*, semtok-ar-*, debug-tiny
    overrides: dict[str, Any] = field(default_factory=dict)  # single GPTConfig fields, e.g. {n_layer: 4, rope: 1d}
    class_dropout: float = field(default=0.1, metadata=ok("in [0, 1)"))  # labels dropped to the null class (CFG)
    label_smoothing: float = field(default=0.0, metadata=ok("in [0, 1)"))
    ema_decay: float = field(default=0.9999, metadata=ok("in [0, 1)"))  # EMA of the AR model (exported as ar_ema); 0: none (AliTok's code)
    # weight decay on the token and class embedding tables (LlamaGen: yes; AliTok's code: no, utils/train_utils.py
    # create_optimizer excludes every "embedding" parameter)
    decay_embeddings: bool = True
    attn_backend: Literal["auto", "flash", "sdpa", "math"] = "auto"
    grad_checkpointing: bool = False
    tokenizer_export: Optional[str] = None  # an export/ folder with the tokens' tokenizer: decodes the sample grid, exported beside the AR model
    sample_cfg_scale: float = field(default=2.0, metadata=ok(">= 0"))  # classifier-free guidance of the sample grid (1.0: off)
    sample_temperature: float = field(default=1.0, metadata=ok("> 0"))
    sample_top_k: int = field(default=0, metadata=ok(">= 0"))  # 0: off
    sample_top_p: float = field(default=1.0, metadata=ok("in (0, 1]"))  # 1.0: off


@dataclass
class MaskedARConfig(ARConfig):
    """SemTok-style masked AR (../shared/REFERENCE.md "SemTok"): a bidirectional GPT predicts the
    masked tokens of each sequence, mask ratio ~ U[mask_min, mask_max] per sample in a random order;
    a bitwise head for the semtok-ar-* presets; label smoothing 0.01."""

    model: str = "semtok-ar-l"
    label_smoothing: float = field(default=0.01, metadata=ok("in [0, 1)"))
    mask_min: float = field(default=0.7, metadata=ok("in (0, 1]"))  # lowest mask ratio of a sample
    mask_max: float = field(default=1.0, metadata=ok("in (0, 1]"))  # highest mask ratio of a sample
    sample_cfg_scale: float = field(default=6.0, metadata=ok(">= 0"))  # linear CFG: SemTok-AR-L 6.0, XL 5.3, XXL 4.9 (semtok.txt B.2)
    sample_top_p: float = field(default=0.75, metadata=ok("in (0, 1]"))  # per bit for a bitwise head
    sample_steps: int = field(default=64, metadata=ok(">= 1"))  # cosine schedule steps (at most seq_len)
