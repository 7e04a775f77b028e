"""VAπ: pixel-space post-training of an AR image generator (../shared/seeds/vapi.txt).

Rollout: one teacher-forced forward of the policy over an image's (optionally noised) ground-truth
token prefix; G sequences per image sampled position-wise from those logits; each decoded by the
frozen tokenizer and scored with reward = -(w_mse MSE + w_lpips LPIPS) against the real image
(system/methods/vapi_rollouts.py: the rollouts, the rollout actors' worker and the source that
feeds the learner). The GRPO update (system/methods/grpo.py) raises the log-probability of the better samples, with a
cross-entropy prior on the ground-truth tokens. Works with our 1D tokenizer + GPT (EOSTok/AliTok
exports, AliTok's released checkpoints imported with jobs/import_alitok.py) and LlamaGen's VQ-16 +
c2i GPT, or any registered kinds, through the protocols of system.models.artifacts (`Tokenizer`,
`Generator`). Codes the decoder does not read (`Tokenizer.unread_prefix`: an AliTok stage 2 that
drops the prefix) get no policy gradient. A masked generator (SemTok's) is refused: teacher-forced
per-position sampling is undefined for it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from system.config import VapiConfig
from system.methods.base import DataSpec, Method, ModuleSpec, RunReport, StepOutput
from system.methods.grpo import GRPOConfig, grpo_loss
from system.methods.registry import register
from system.methods.vapi_rollouts import (  # noqa: F401 - the rollout side; old import paths
    MASKED_POLICY,
    RolloutConfig,
    Rollouts,
    VapiRollouts,
    exported_policy_state,
    heldout_reward,
    load_parts,
    noise_tokens,
    pixel_reward,
    rollout,
    rollout_config,
)
from system.models import weights
from system.models.artifacts import Artifact, Generator, Tokenizer, check_fit
from system.models.tokenizers import frozen_tokenizer  # noqa: F401 - old import path
from system.sampling.generators import load_llamagen, load_pair
from system.sampling.gpt_generator import GPTGenerator


# The policy is an AR generator + the codebook it embeds codes through (GPTGenerator,
# system/sampling/gpt_generator.py); check_fit and frozen_tokenizer stay importable here.
VapiPolicy = GPTGenerator


def vapi_loss(policy: Generator, batch: Rollouts, cfg: GRPOConfig, reference: Optional[Generator] = None,
              policy_from: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO + prior loss of `policy` on a rollout batch (one teacher-forced forward per image); the
    policy terms skip the first `policy_from` positions (codes the decoder does not read: grpo_loss)."""
    logits = policy(batch.inputs, batch.labels)  # (B, L, V); grpo_loss scales by 1 / cfg.temperature
    ref_logits = None
    if reference is not None and cfg.kl > 0:
        with torch.no_grad():
            ref_logits = reference(batch.inputs, batch.labels)
    loss, m = grpo_loss(logits, batch.image_index, batch.tokens, batch.logp, batch.rewards, batch.group_ids,
                        batch.gt_tokens, cfg, ref_logits, policy_from)
    m["reward_mean"] = batch.rewards.mean()
    m["reward_std"] = batch.rewards.std() if batch.rewards.numel() > 1 else batch.rewards.new_zeros(())
    m["mse"], m["lpips"] = batch.mse.mean(), batch.lpips.mean()
    return loss, m


def check_config(m: VapiConfig, data: DataSpec) -> None:
    """Method-level rules, before any actor starts (the export's model.json is read, nothing built)."""
    if bool(m.export_url) == bool(m.llamagen_gpt or m.llamagen_vq):
        raise ValueError("set either method.export_url or method.llamagen_gpt + method.llamagen_vq (and export_url=null)")
    if m.w_lpips > 0 and not (m.lpips_net.vgg_path or m.lpips_net.random_init):
        weights.unset("LPIPS VGG16 + linear heads", "method.lpips_net.vgg_path, lin_path",
                      "method.w_lpips > 0 needs method.lpips_net.vgg_path/lin_path (or random_init=true for a demo)")
    if m.group_size < 2:
        raise ValueError(f"method.group_size={m.group_size}: advantages are normalised within a group; use group_size >= 2")
    if m.temperature <= 0:
        raise ValueError(f"method.temperature={m.temperature} must be > 0")
    if m.export_url:
        from system.models.artifacts import model_part

        try:
            size = model_part(m.export_url, "tokenizer", data.storage)["config"].get("image_size")
            ar = model_part(m.export_url, "ar", data.storage)
        except FileNotFoundError as e:
            raise ValueError(f"method.export_url: {e} (train one with jobs/eostok_h.py first; the embedded demo's is made by `make demo`)") from None
        except KeyError as e:
            raise ValueError(f"method.export_url: {e.args[0]} (VAπ post-trains the export's AR model, part 'ar')") from None
        if ar["config"].get("bidirectional"):  # the Generator's `masked`, read off its config before anything is built
            raise ValueError(f"method.export_url = {m.export_url!r}: its AR model (kind {ar['kind']!r}) {MASKED_POLICY}")
        if size is not None and size != data.resolution:
            raise ValueError(f"data.resolution={data.resolution} but the tokenizer of {m.export_url} works at "
                             f"{size} px; set data.resolution={size}")


class VapiMethod(Method):
    """VAπ's GRPO learner as a method: one module "policy" (the AR generator, trained), one phase
    "policy" on a batch of rollouts {"rollouts": Rollouts, "stats": whole-batch statistics} from
    the rollout actors (`VapiRollouts`, bound to an actor pool by cluster/). The frozen tokenizer is
    exported beside the post-trained policy, so sampling and evaluation run on the result."""

    def __init__(self, cfg: VapiConfig, data: DataSpec):
        check_config(cfg, data)
        super().__init__(cfg, data)
        self.rcfg = rollout_config(cfg)
        self.tokenizer: Optional[Tokenizer] = None
        self.reference = self._load()[0].eval().requires_grad_(False) if cfg.kl > 0 else None

    @classmethod
    def check(cls, cfg: VapiConfig, data: DataSpec) -> None:
        check_config(cfg, data)

    def _load(self) -> tuple[Generator, Tokenizer]:
        m = self.cfg
        policy, tok, _ = load_parts(m.export_url, m.llamagen_gpt, m.llamagen_vq, use_lpips=False, storage=self.data.storage,
                                    llamagen_preset=m.llamagen_preset, **m.gpt_overrides)
        check_fit(policy, tok, self.data.resolution)
        self.tokenizer = tok
        return policy, tok

    def frozen_parts(self) -> list[nn.Module]:
        return [self.reference] if self.reference is not None else []

    def modules(self) -> dict[str, ModuleSpec]:
        return {"policy": ModuleSpec(self._load()[0])}

    def phases(self) -> list[str]:
        return ["policy"]

    def step(self, phase: str, mods: dict, batch: dict, step: int, carry: dict) -> StepOutput:
        policy = mods["policy"]
        # train: dropout + class dropout as the official update (ratios != 1, the clip acts on-policy);
        # eval: a deterministic update (on-policy ratios are exactly 1)
        policy.train(self.cfg.update_mode == "train")
        tok = getattr(self, "tokenizer", None)  # loaded with the policy by modules()
        skip = tok.unread_prefix if tok is not None else 0  # codes the decoder does not read: no policy gradient
        loss, m = vapi_loss(policy, batch["rollouts"], self.rcfg.grpo, self.reference, skip)
        for k in ("reward_mean", "reward_std", "mse", "lpips", "adv_mean", "adv_std", "adv_abs_max"):
            m.pop(k, None)  # this rank's share: the whole batch's values come in `stats`
        device = loss.device
        m.update({k: torch.tensor(float(v), device=device) for k, v in batch["stats"].items()})
        return StepOutput(loss, m)

    def curve_keys(self) -> list[str]:
        return ["loss", "reward_mean", "ce_prior", "clip_frac", "ratio_mean", "weight_sync_s"]

    def sample_batch(self, batch, n):
        return None  # no image grid: the held-out reward is measured by the rollout actors

    report_keys = ("step", "loss", "reward_mean", "ce_prior", "groups_trained", "rollout_reissued", "learner_restarts")

    @classmethod
    def report(cls, cfg: VapiConfig, metrics: dict[str, Any], val: dict[str, float], export_url: Optional[str],
               val_of: Callable[[str], dict[str, float]]) -> RunReport:
        """The held-out teacher-forced reward before -> after (the actors' probe), the last update's
        metrics, and the run's trained groups, rollout re-issues and learner restarts."""
        rep = super().report(cfg, metrics, val, export_url, val_of)
        start, end = metrics.get("heldout_start"), metrics.get("heldout_end")
        if start is not None:
            after = f"{end:.4f}" if end is not None else "(no export)"
            rep.rows.insert(0, ("held-out reward", f"{start:.4f} -> {after}"))
        rep.summary.update({"heldout_start": start, "heldout_end": end, "groups": metrics.get("groups_trained", 0),
                            "rollout_reissued": metrics.get("rollout_reissued", 0),
                            "learner_restarts": metrics.get("learner_restarts", 0)})
        return rep

    def artifacts(self, mods: dict) -> dict[str, Artifact]:
        if self.tokenizer is None:
            self._load()
        return {"tokenizer": self.tokenizer.artifact(), "ar": mods["policy"].artifact()}


register("vapi", VapiConfig, VapiMethod, source=VapiRollouts())

