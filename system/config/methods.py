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
class ModelConfig:
    """Sizes come from registries with exact names; `*_overrides` change single fields."""

    tokenizer: str = "eostok-tok"
    tokenizer_overrides: dict[str, Any] = field(default_factory=dict)
    ar: str = "eostok-h"
    ar_overrides: dict[str, Any] = field(default_factory=dict)
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
    align: float = field(default=0.5, metadata=ok(">= 0"))  # implicit alignment: encoder 2D hidden patches vs teacher features
    repa: float = field(default=0.0, metadata=ok(">= 0"))  # REPA-style decoder alignment
    repa_layer: int = field(default=1, metadata=ok(">= 0"))
    detach_ar_input: bool = False  # True: two-stage baseline (no NTP gradient into the tokenizer)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lpips_net: LPIPSConfig = field(default_factory=LPIPSConfig)
    ema_decay: float = field(default=0.9999, metadata=ok("in [0, 1)"))  # EMA of the generator (tokenizer + AR); 0: none
    disc_lr: float = field(default=1e-4, metadata=ok("> 0"))  # the discriminator's own AdamW settings (the generator uses optim.*)
    disc_betas: tuple[float, float] = (0.5, 0.9)
    sample_cfg_scale: float = field(default=2.0, metadata=ok(">= 0"))
    sample_temperature: float = field(default=1.0, metadata=ok("> 0"))


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
