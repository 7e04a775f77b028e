"""VAπ post-training config (jobs/vapi.py): the shared experiment sections plus `method`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from system.config.schema import DataConfig, ExperimentConfig, LPIPSConfig, OptimConfig
from system.data.storage import protocol


@dataclass
class VapiMethodConfig:
    """Paper defaults (../shared/REFERENCE.md "VAπ"): group 8, clip 0.2, adv clip 5, beta 0.1."""

    export_url: Optional[str] = "runs/eostok-h/export"  # a run's export/ folder (ours): jobs/eostok_h.py's default run
    llamagen_gpt: Optional[str] = None  # LlamaGen c2i_*.pt (then set export_url=null)
    llamagen_vq: Optional[str] = None  # LlamaGen vq_ds16_c2i.pt
    llamagen_preset: Optional[str] = None  # GPT size (llamagen-b ... llamagen-3b); null: inferred from the weights
    gpt_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {block_size: 576} for 384px
    group_size: int = 8
    noise_p: float = 0.0  # contextual noise (code default 0.5, off in the shipped script)
    temperature: float = 1.0
    w_mse: float = 1.0
    w_lpips: float = 1.0
    clip_eps: float = 0.2
    adv_clip: float = 5.0
    beta: float = 0.1  # prior regulariser (CE on ground-truth tokens)
    kl: float = 0.0  # KL to the frozen initial policy (0: off)
    lpips_net: LPIPSConfig = field(default_factory=LPIPSConfig)
    num_rollout_workers: int = 2
    cpus_per_rollout_worker: float = 1.0
    gpus_per_rollout_worker: float = 0.0
    rollout_max_restarts: int = 3
    off_policy: bool = False  # one-step off-policy: rollouts of k+1 overlap the update of k
    heldout_images: int = 8  # held-out images for the teacher-forced reward check (0: off)
    crash_rollout_at_call: Optional[int] = None  # fault injection: a rollout actor dies at this call (once)


@dataclass
class VapiExperiment(ExperimentConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(fraction=0.01, batch_size=8))  # 1% of the shards; 8 images x group 8
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-6, min_lr=1e-6, betas=(0.9, 0.999), weight_decay=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0))
    method: VapiMethodConfig = field(default_factory=VapiMethodConfig)


def check_vapi_config(cfg: VapiExperiment) -> None:
    """Cross-field checks, before any actor starts (jobs/vapi.py and cluster.vapi_run.run_vapi)."""
    m = cfg.method
    if bool(m.export_url) == bool(m.llamagen_gpt or m.llamagen_vq):
        raise ValueError("set either method.export_url or method.llamagen_gpt + method.llamagen_vq (and export_url=null)")
    if m.w_lpips > 0 and not (m.lpips_net.vgg_path or m.lpips_net.random_init):
        raise ValueError("method.w_lpips > 0 needs method.lpips_net.vgg_path/lin_path (or random_init=true for a demo)")
    if cfg.data.batch_size < 1 or m.group_size < 2:
        raise ValueError("data.batch_size (images per iteration) must be >= 1 and method.group_size >= 2")
    if cfg.optim.grad_accum != 1:
        raise ValueError(f"optim.grad_accum={cfg.optim.grad_accum}: a VAπ iteration is one update on the whole "
                         "batch; set optim.grad_accum=1 and size the batch with data.batch_size")
    if m.crash_rollout_at_call is not None and protocol(cfg.checkpoint.storage_path) != "file":
        raise ValueError("method.crash_rollout_at_call (fault injection) needs a local checkpoint.storage_path "
                         "(its once-per-run marker is a local file)")
    if cfg.data.batch_size % cfg.cluster.num_workers:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} images per iteration must split evenly over "
                         f"cluster.num_workers={cfg.cluster.num_workers} learner ranks")
    if m.export_url:
        from system.models.export_io import read_model_json

        try:
            size = read_model_json(m.export_url, cfg.data.storage)["tokenizer"]["image_size"]
        except FileNotFoundError as e:
            raise ValueError(f"method.export_url: {e} (train one with jobs/eostok_h.py first; the embedded demo's is made by `make demo`)") from None
        if size != cfg.data.resolution:
            raise ValueError(f"data.resolution={cfg.data.resolution} but the tokenizer of {m.export_url} works at "
                             f"{size} px; set data.resolution={size}")
