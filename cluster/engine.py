"""One DeepSpeed engine interface: the DS config is generated from our schema here and nowhere else.

`DeepSpeedStrategy(cfg.deepspeed, cfg.optim, device, ...)` prepares modules as DeepSpeed engines
(ZeRO 0-3, AdamW with decay on matrices only, gradient clipping and accumulation, optional CPU
offload), runs backward/step, sets the LR of a step, saves/loads engine state in a local folder
and consolidates full weights on rank 0 for any ZeRO stage.

Checkpoint files: at the world size a checkpoint was written with, rank r loads only the model
states file(s) and its own ZeRO partition (`rank_needs`); at another world size or ZeRO layout
`load_resharded` re-partitions (cluster/repartition.py).

Precision: `bf16` runs the forward passes under torch autocast (DeepSpeed's `torch_autocast`
section: fp32 master weights, bf16 matmuls/convs and bf16 gradient communication for Linear/Conv
weights), `fp32` runs plain fp32; `auto` is bf16 on GPU and fp32 on CPU. DeepSpeed's native
`bf16` mode (bf16 weights) can be chosen through `deepspeed.extra`, if the method casts its inputs.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import types
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from system.methods.base import frozen  # noqa: F401  (re-exported: the pool freezes D in G steps)

if not torch.cuda.is_available():  # must precede the first `import deepspeed` (pitfall: CPU accelerator)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

# DeepSpeed 0.19's ZeRO engines import its Muon modules (to list Muon as supported, for
# `isinstance(optimizer, MuonWithAuxAdam)` checks, and `muon_update` for parameters marked
# `use_muon`), and those torch.compile at import: the import of torch._dynamo and torch._inductor,
# 2-5 s of CPU in every rank process. Our engines run AdamW (the config below names it) on
# parameters never marked `use_muon`: before DeepSpeed's first import, each module is a stand-in
# whose names refuse to be used.
MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")
_NO_MUON = "DeepSpeed's Muon optimizer is not available here: cluster.engine runs AdamW (it stands in for {} " \
           "to keep its compile at import out of every rank)"


class _NoMuon(torch.optim.Optimizer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(_NO_MUON.format(type(self).__module__))


def _muon_stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "stand-in: see cluster/engine.py")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(_NO_MUON.format(name))

    class MuonWithAuxAdam(_NoMuon):
        __module__ = name

    module.MuonWithAuxAdam, module.muon_update, module.adam_update = MuonWithAuxAdam, refuse, refuse  # type: ignore[attr-defined]
    return module


for _name in MUON_MODULES:
    sys.modules.setdefault(_name, _muon_stand_in(_name))

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402

from cluster.integrity import Digest, save_torch  # noqa: E402
from cluster.repartition import (META_FILE, MODEL_FILE, ZERO_FILE, CheckpointFiles, ds_load, local_parts,  # noqa: E402
                                 model_meta, partition_rank, repartitionable, reshard_into, reshard_local)
from cluster.repartition import files_to_read as repartition_reads  # noqa: E402
from system.config import DeepSpeedConfig, OptimConfig  # noqa: E402


def deep_merge(base: dict, extra: dict) -> dict:
    """`base` updated recursively with `extra` (dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def param_groups(module: nn.Module, weight_decay: float, no_decay_names: Sequence[str] = ()) -> list[dict]:
    """AdamW groups: decay on parameters with >= 2 dims, none on biases/norms/scalars and on the
    parameters `no_decay_names` names (ModuleSpec.no_decay)."""
    unknown = set(no_decay_names) - {n for n, _ in module.named_parameters()}
    if unknown:
        raise ValueError(f"no_decay names parameters the module does not have: {sorted(unknown)}")
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and n not in no_decay_names]
    no_decay = [p for n, p in params if p.ndim < 2 or n in no_decay_names]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class DeepSpeedStrategy:
    """Builds and drives DeepSpeed engines from `DeepSpeedConfig` + `OptimConfig`."""

    def __init__(
        self,
        ds: DeepSpeedConfig,
        optim: OptimConfig,
        device: torch.device,
        *,
        micro_batch_size: int = 1,
        world_size: Optional[int] = None,
    ):
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.offload_params and ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage=3 (only ZeRO-3 partitions parameters)")
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if optim.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {optim.grad_accum}")
        self.ds, self.optim, self.device = ds, optim, torch.device(device)
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if dist.is_initialized() else 1)

    # ------------------------------------------------------------------ config
    @property
    def precision(self) -> str:
        if self.ds.precision == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        return self.ds.precision

    @property
    def zero_stage(self) -> int:
        return int(self.ds.zero_stage)

    def ds_config(self, *, lr: float, betas: tuple[float, float], weight_decay: Optional[float] = None) -> dict:
        """The DeepSpeed config for one engine (the only place it is generated)."""
        o, ds = self.optim, self.ds
        on_gpu = self.device.type == "cuda"
        zero: dict[str, Any] = {"stage": self.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
        if not on_gpu:  # DeepSpeed's 5e8-element default buckets are sized for GPUs; keep CPU runs lean
            zero.update(reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
        bf16 = self.precision == "bf16"
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": o.grad_accum,
            "train_batch_size": self.micro_batch_size * o.grad_accum * self.world_size,
            "gradient_clipping": float(o.grad_clip),
            "zero_optimization": zero,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": lr,
                    "betas": list(betas),
                    "eps": o.eps,
                    "weight_decay": o.weight_decay if weight_decay is None else weight_decay,
                    # torch's AdamW needs no compiled op; with optimizer offload DeepSpeed's CPU Adam runs the step
                    "torch_adam": not ds.offload_optimizer,
                },
            },
            "zero_allow_untested_optimizer": True,
            "fp16": {"enabled": False},
            "bf16": {"enabled": False},
            "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        return deep_merge(cfg, ds.extra or {})

    # ------------------------------------------------------------------ engines
    def prepare(
        self, model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: Optional[float] = None,
        external: Sequence[nn.Parameter] = (), no_decay: Sequence[str] = (),
    ) -> "deepspeed.DeepSpeedEngine":
        """Move `model` to the device and wrap it (with its AdamW) in a DeepSpeed engine. `external`:
        parameters of `model` read outside their own module's forward (registered under ZeRO-3);
        `no_decay`: parameter names without weight decay (`param_groups`)."""
        model = model.to(self.device)
        wd = self.optim.weight_decay if weight_decay is None else weight_decay
        config = self.ds_config(lr=lr, betas=betas, weight_decay=wd)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, wd, no_decay), config=config, dist_init_required=False
        )
        if self.is_partitioned(engine):  # parameters read outside their own module's forward
            for p in external:
                deepspeed.zero.register_external_parameter(model, p)
        return engine

    def autocast(self, engine) -> contextlib.AbstractContextManager:
        """Context for forward passes of `engine.module` (autocast when precision is bf16)."""
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        return autocast_if_enabled(engine)

    @staticmethod
    def backward(engine, loss: torch.Tensor) -> None:
        engine.backward(loss)

    @staticmethod
    def step(engine) -> None:
        """Optimizer step at the accumulation boundary (a no-op micro-step before it); zeroes grads."""
        engine.step()

    @staticmethod
    def set_lr(engine, lr: float) -> None:
        for g in engine.optimizer.param_groups:
            g["lr"] = lr

    @staticmethod
    def get_lr(engine) -> float:
        return float(engine.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ state
    @staticmethod
    def save(engine, directory: str, tag: str) -> dict[str, Digest]:
        """Collective: this rank's DeepSpeed files go to `directory/tag/` (rank 0 also writes the module
        file and, under ZeRO 1/2, `META_FILE`: that file without the weights, which a resume reads instead).
        Returns the size and checksum of each file written (by path), taken while writing."""
        digests: dict[str, Digest] = {}
        _sorted_optimizer_state(engine)
        inner = engine.checkpoint_engine
        if type(inner) is TorchCheckpointEngine:  # another engine (e.g. a decoupled writer) writes as it does
            engine.checkpoint_engine = _HashingCheckpointEngine(inner, digests)
        try:
            engine.save_checkpoint(directory, tag=tag, save_latest=False)
        finally:
            engine.checkpoint_engine = inner
        folder = os.path.join(directory, tag)
        if repartitionable(engine) and not engine.zero_optimization_partition_weights():
            model = next((n for n in sorted(os.listdir(folder)) if MODEL_FILE.match(n)), None)
            if model is not None:  # rank 0's folder
                path = os.path.join(folder, META_FILE)
                digests[path] = save_torch(model_meta(ds_load(os.path.join(folder, model), mmap=True)), path)
        return digests

    @staticmethod
    def load(engine, directory: str, tag: str) -> None:
        """Collective: DeepSpeed's own restore of module and optimizer state saved by `save` from the
        local folder `directory/tag/` (same world size; the files `rank_needs` names for this rank)."""
        path, _ = engine.load_checkpoint(
            directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' under {directory}")

    @staticmethod
    def rank_needs(engine, name: str, rank: int) -> bool:
        """Whether rank `rank` reads the file `name` of an engine's checkpoint folder in `load` (at the
        world size it was written with): every file except the other ranks' ZeRO partitions (all of
        them with DeepSpeed's `elastic_checkpoint`, which merges every partition) and `META_FILE`."""
        if name == META_FILE:
            return False
        m = ZERO_FILE.match(name)
        if m is None:
            return True
        if engine is not None and engine.zero_optimization() and engine.zero_elastic_checkpoint():
            return True
        return int(m["rank"]) == rank

    def load_files(self, engine, files: CheckpointFiles, same_world: bool) -> None:
        """Collective: restore `engine` from its checkpoint folder `files`, written at the same world
        size (`same_world`) or another one; each file is fetched only if this rank reads it.
        Same world: ZeRO-3 (and DeepSpeed's bf16 ZeRO-1 optimizer) load with DeepSpeed from this
        rank's model and optimizer files; ZeRO 1/2 from `META_FILE` and this rank's optimizer file
        (not the module file with every weight); without ZeRO from the one replicated file. Another
        world size or ZeRO-3 <-> 1/2: `load_resharded`."""
        names = self._native_names(engine, files, same_world)
        if names is None:
            return self.load_resharded(engine, files)
        _native_load(engine, files, names)

    def files_to_read(self, engine, files: CheckpointFiles, same_world: bool) -> list[str]:
        """The names of `files` that `load_files` reads on this rank (a resume fetches and checks them
        all before any rank loads)."""
        names = self._native_names(engine, files, same_world)
        if names is not None:
            return names
        self._check_reshardable(engine, files)
        return repartition_reads(engine, files)

    def _native_names(self, engine, files: CheckpointFiles, same_world: bool) -> Optional[list[str]]:
        """The files DeepSpeed's own load reads on this rank, or None when the state must be re-partitioned."""
        shards = [n for n in files.names if ZERO_FILE.match(n) and ZERO_FILE.match(n)["kind"] == "optim"]
        if not shards:  # written without ZeRO: one replicated file, at any data-parallel size
            if self.zero_stage != 0:
                raise RuntimeError(f"checkpoint {files.where} was written without ZeRO (zero_stage=0); resume it with "
                                   "deepspeed.zero_stage=0")
            return list(files.names)
        if self.zero_stage == 0:
            raise RuntimeError(f"checkpoint {files.where} holds ZeRO partitions; resume it with deepspeed.zero_stage >= 1")
        was_stage3 = any(ZERO_FILE.match(n)["kind"] == "model" for n in files.names if ZERO_FILE.match(n))
        layout_kept = same_world and was_stage3 == engine.zero_optimization_partition_weights()
        if layout_kept and (was_stage3 or META_FILE not in files.names or not repartitionable(engine)):
            rank, _ = partition_rank(engine)
            return [n for n in files.names if self.rank_needs(engine, n, rank)]
        return None

    def load_resharded(self, engine, files: CheckpointFiles) -> None:
        """Collective: restore module and optimizer state from an engine checkpoint folder written at
        any world size with ZeRO 1-3, into any ZeRO 1-3 layout: this rank fetches only the old
        shards overlapping its new partition (releasing each once copied) and the weight-free
        model metadata; fp32 master weights, Adam moments and step come back exactly."""
        self._check_reshardable(engine, files)
        reshard_into(engine, files)

    def _check_reshardable(self, engine, files: CheckpointFiles) -> None:
        if self.zero_stage == 0 or not repartitionable(engine):
            raise RuntimeError(f"checkpoint {files.where}: {type(engine.optimizer).__name__} state cannot be re-partitioned "
                               "(ZeRO stages 1-3 with DeepSpeed's ZeRO optimizers only); resume at the world size and ZeRO "
                               "stage it was written with")

    def reshard_local(self, engine, old_world: int, part: Callable[[int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This rank's ZeRO-3 slices (shaped as `local_params`) of tensors that were partitioned the
        same way over `old_world` ranks; `part(k)` gives old rank k's slices (asked only for the old
        ranks overlapping this rank's slices: `reshard_local_parts`)."""
        return reshard_local(engine, old_world, part)

    @staticmethod
    def reshard_local_parts(engine, old_world: int) -> list[int]:
        """The old ranks whose slices `reshard_local` asks for on this rank."""
        return local_parts(engine, old_world)

    def is_partitioned(self, engine) -> bool:
        """True when parameters are sharded across ranks (ZeRO-3)."""
        return self.zero_stage == 3

    def local_params(self, engine) -> dict[str, torch.Tensor]:
        """This rank's parameter values by name: full tensors (ZeRO 0-2) or its ZeRO-3 partitions."""
        return {n: (p.ds_tensor if hasattr(p, "ds_tensor") else p.data) for n, p in engine.module.named_parameters()}

    @contextlib.contextmanager
    def gathered(self, engine) -> Iterator[nn.Module]:
        """Collective: inside, every rank sees the full parameters of `engine.module` (read-only)."""
        if self.is_partitioned(engine):
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                yield engine.module
        else:
            yield engine.module

    def gathered_state_dict(self, engine) -> dict[str, torch.Tensor]:
        """Collective: the full state dict as CPU tensors on rank 0 ({} on other ranks), any ZeRO stage.
        ZeRO-3 parameters are gathered one at a time to bound memory."""
        module = engine.module
        rank0 = _rank() == 0
        out: dict[str, torch.Tensor] = {}
        if not self.is_partitioned(engine):
            if rank0:
                out = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            return out
        for key, value in module.state_dict(keep_vars=True).items():
            if hasattr(value, "ds_id"):
                with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                    if rank0:
                        out[key] = value.detach().cpu().clone()
            elif rank0:
                out[key] = value.detach().cpu().clone()
        return out


class _HashingCheckpointEngine:
    """DeepSpeed's `TorchCheckpointEngine` whose `save` writes through `integrity.save_torch`, so
    each file's size and checksum are taken while it is written (recorded in `digests` by path)."""

    def __init__(self, inner: TorchCheckpointEngine, digests: dict[str, Digest]):
        self.inner, self.digests = inner, digests

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        self.digests[path] = save_torch(state_dict, path, zipfile=self.inner.zipfile_serialization)


def _sorted_optimizer_state(engine) -> None:
    """Each parameter's optimizer state (torch's and every wrapper's around it) in sorted key order,
    in place: DeepSpeed's restore adds `step` after the moments where a fresh optimizer has it first,
    and pickle keeps dict order, so a resumed run would save the same values as other bytes than
    one that never stopped (checkpoints are compared byte for byte)."""
    opt, seen = getattr(engine, "optimizer", None), set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        state = getattr(opt, "__dict__", {}).get("state")  # a torch optimizer's own dict, not a property
        if isinstance(state, dict):
            for st in state.values():
                if isinstance(st, dict) and list(st) != sorted(st, key=str):
                    items = sorted(st.items(), key=lambda kv: str(kv[0]))
                    st.clear()
                    st.update(items)
        opt = getattr(opt, "optimizer", None)


def _native_load(engine, files: CheckpointFiles, names: Sequence[str]) -> None:
    """DeepSpeed's `load_checkpoint` on the files `names` of `files` (fetched into one local folder)."""
    folder = None
    for n in names:
        folder = os.path.dirname(files.path(n))
    if folder is None:
        raise FileNotFoundError(f"checkpoint {files.where} is empty")
    DeepSpeedStrategy.load(engine, os.path.dirname(folder), os.path.basename(folder))
