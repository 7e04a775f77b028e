"""One DeepSpeed engine interface: the DS config is generated from our schema here and nowhere else.

`DeepSpeedStrategy(cfg.deepspeed, cfg.optim, device, ...)` prepares modules as DeepSpeed engines
(ZeRO 0-3, AdamW with decay on matrices only, gradient clipping and accumulation, optional CPU
offload), runs backward/step, sets the LR of a step, saves/loads engine state in a local folder
and consolidates full weights on rank 0 for any ZeRO stage.

Checkpoint files: at the world size a checkpoint was written with, rank r loads only the model
states file(s) and its own ZeRO partition (`rank_needs`): DeepSpeed's `load_checkpoint` reads
nothing else (`mp_rank_00_model_states.pt` + `zero_pp_rank_{r}_mp_rank_00_optim_states.pt`, at
ZeRO-3 `zero_pp_rank_{r}_mp_rank_00_{model,optim}_states.pt`). At another world size
`load_resharded` re-partitions: each rank copies, from the old shards that overlap its new
partition only, the fp32 master values and optimizer moments of its new partition (any ZeRO
stage 1-3 to any stage 1-3), then DeepSpeed refreshes the working weights from them.

Precision: `bf16` runs the forward passes under torch autocast (DeepSpeed's `torch_autocast`
section: fp32 master weights, bf16 matmuls/convs and bf16 gradient communication for Linear/Conv
weights), `fp32` runs plain fp32; `auto` is bf16 on GPU and fp32 on CPU. DeepSpeed's native
`bf16` mode (bf16 weights) can be chosen through `deepspeed.extra`, if the method casts its inputs.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import nn

from system.methods.base import frozen  # noqa: F401  (re-exported: the pool freezes D in G steps)

if not torch.cuda.is_available():  # must precede the first `import deepspeed` (pitfall: CPU accelerator)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from system.config import DeepSpeedConfig, OptimConfig  # noqa: E402


def deep_merge(base: dict, extra: dict) -> dict:
    """`base` updated recursively with `extra` (dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on parameters with >= 2 dims, none on biases/norms/scalars."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
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
        external: Sequence[nn.Parameter] = (),
    ) -> "deepspeed.DeepSpeedEngine":
        """Move `model` to the device and wrap it (with its AdamW) in a DeepSpeed engine. `external`:
        parameters of `model` read outside their own module's forward (registered under ZeRO-3)."""
        model = model.to(self.device)
        wd = self.optim.weight_decay if weight_decay is None else weight_decay
        config = self.ds_config(lr=lr, betas=betas, weight_decay=wd)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, wd), config=config, dist_init_required=False
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
    def save(engine, directory: str, tag: str) -> None:
        """Collective: this rank's DeepSpeed files go to `directory/tag/` (rank 0 also writes the module
        file and, under ZeRO 1/2, `META_FILE`: that file without the weights, which a resume reads instead)."""
        engine.save_checkpoint(directory, tag=tag, save_latest=False)
        folder = os.path.join(directory, tag)
        if _repartitionable(engine) and not engine.zero_optimization_partition_weights():
            model = next((n for n in sorted(os.listdir(folder)) if _MODEL_FILE.match(n)), None)
            if model is not None:  # rank 0's folder
                torch.save(_model_meta(_ds_load(os.path.join(folder, model), mmap=True)), os.path.join(folder, META_FILE))

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
        m = _ZERO_FILE.match(name)
        if m is None:
            return True
        if engine is not None and engine.zero_optimization() and engine.zero_elastic_checkpoint():
            return True
        return int(m["rank"]) == rank

    def load_files(self, engine, files: "CheckpointFiles", same_world: bool) -> None:
        """Collective: restore `engine` from its checkpoint folder `files`, written at the same world
        size (`same_world`) or another one; each file is fetched only if this rank reads it.
        Same world: ZeRO-3 (and DeepSpeed's bf16 ZeRO-1 optimizer) load with DeepSpeed from this
        rank's model and optimizer files; ZeRO 1/2 from `META_FILE` and this rank's optimizer file
        (not the module file with every weight); without ZeRO from the one replicated file. Another
        world size or ZeRO-3 <-> 1/2: `load_resharded`."""
        shards = [n for n in files.names if _ZERO_FILE.match(n) and _ZERO_FILE.match(n)["kind"] == "optim"]
        if not shards:  # written without ZeRO: one replicated file, at any data-parallel size
            if self.zero_stage != 0:
                raise RuntimeError(f"checkpoint {files.where} was written without ZeRO (zero_stage=0); resume it with "
                                   "deepspeed.zero_stage=0")
            return _native_load(engine, files, files.names)
        if self.zero_stage == 0:
            raise RuntimeError(f"checkpoint {files.where} holds ZeRO partitions; resume it with deepspeed.zero_stage >= 1")
        was_stage3 = any(_ZERO_FILE.match(n)["kind"] == "model" for n in files.names if _ZERO_FILE.match(n))
        layout_kept = same_world and was_stage3 == engine.zero_optimization_partition_weights()
        if layout_kept and (was_stage3 or META_FILE not in files.names or not _repartitionable(engine)):
            rank, _ = _partition_rank(engine)
            return _native_load(engine, files, [n for n in files.names if self.rank_needs(engine, n, rank)])
        self.load_resharded(engine, files)

    def load_resharded(self, engine, files: "CheckpointFiles") -> None:
        """Collective: restore module and optimizer state from an engine checkpoint folder written at
        any world size with ZeRO 1-3, into any ZeRO 1-3 layout: this rank fetches only the old
        shards overlapping its new partition (releasing each once copied) and the weight-free
        model metadata; fp32 master weights, Adam moments and step come back exactly."""
        if self.zero_stage == 0 or not _repartitionable(engine):
            raise RuntimeError(f"checkpoint {files.where}: {type(engine.optimizer).__name__} state cannot be re-partitioned "
                               "(ZeRO stages 1-3 with DeepSpeed's ZeRO optimizers only); resume at the world size and ZeRO "
                               "stage it was written with")
        _reshard_into(engine, _OldZeroLayout(files))

    def reshard_local(self, engine, old_world: int, part: Callable[[int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This rank's ZeRO-3 slices (shaped as `local_params`) of tensors that were partitioned the
        same way over `old_world` ranks; `part(k)` gives old rank k's slices (asked only for the old
        ranks overlapping this rank's slices)."""
        rank, _ = _partition_rank(engine)
        params = [(n, p, p.ds_numel, p.ds_tensor.numel(), math.ceil(p.ds_numel / old_world))
                  for n, p in engine.module.named_parameters()]
        need: set[int] = set()
        for _, _, n, pn, old_pn in params:
            lo, hi = rank * pn, min((rank + 1) * pn, n)
            if lo < hi:
                need.update(range(lo // old_pn, (hi - 1) // old_pn + 1))
        parts = {k: part(k) for k in sorted(need)}
        out = {}
        for name, p, n, pn, old_pn in params:
            dtype = next(iter(parts.values()))[name].dtype if parts else torch.float32
            local = torch.zeros(pn, dtype=dtype)
            for k, old in parts.items():  # old rank k held elements [k*old_pn, (k+1)*old_pn) of each parameter
                lo, hi = max(rank * pn, k * old_pn), min((rank + 1) * pn, (k + 1) * old_pn, n)
                if lo < hi:
                    local[lo - rank * pn : hi - rank * pn] = old[name].reshape(-1)[lo - k * old_pn : hi - k * old_pn]
            out[name] = local.view_as(p.ds_tensor)
        return out

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


# ---------------------------------------------------------------------------- re-partitioning ZeRO state
_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_\d+_(?P<kind>model|optim)_states\.pt$")
_MODEL_FILE = re.compile(r"^mp_rank_\d+_model_states\.pt$")
META_FILE = "ds_model_meta.pt"  # ZeRO 1/2: DeepSpeed's module file without the parameter values (buffers kept)


class CheckpointFiles(Protocol):
    """The files of one engine's checkpoint folder, fetched on demand (`cluster.checkpoint`)."""

    names: list[str]  # file names in the folder
    where: str  # the folder's URL, for messages

    def path(self, name: str) -> str:
        """A local path of file `name` (fetched on first use)."""

    def release(self, name: str) -> None:
        """`name` is no longer needed (its local copy may go)."""


def _ds_load(path: str, mmap: bool = False) -> Any:
    """A DeepSpeed checkpoint file, read with `weights_only=True` (DeepSpeed's few plain classes allowed)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _model_meta(model: dict) -> dict:
    """DeepSpeed's model states dict without the trained parameters' values (kept: shapes, buffers,
    frozen parameters, counters): what re-partitioning needs from it, a small fraction of its size."""
    keep = set(model.get("buffer_names") or []) | set(model.get("frozen_param_shapes") or {})
    out = {k: v for k, v in model.items() if k != "module"}
    out["module"] = {k: v.clone() for k, v in model["module"].items() if k in keep}
    return out


def _repartitionable(engine) -> bool:
    """Whether `engine`'s optimizer is one `_reshard_into` knows (DeepSpeed's ZeRO 1/2 and ZeRO-3 optimizers)."""
    opt = getattr(engine, "optimizer", None)
    return engine.zero_optimization() and (hasattr(opt, "single_partition_of_fp32_groups")
                                           or hasattr(opt, "fp32_partitioned_groups_flat"))


def _native_load(engine, files: "CheckpointFiles", names: Sequence[str]) -> None:
    """DeepSpeed's `load_checkpoint` on the files `names` of `files` (fetched into one local folder)."""
    folder = None
    for n in names:
        folder = os.path.dirname(files.path(n))
    if folder is None:
        raise FileNotFoundError(f"checkpoint {files.where} is empty")
    DeepSpeedStrategy.load(engine, os.path.dirname(folder), os.path.basename(folder))


def _numel(shape) -> int:
    return int(math.prod(shape))


def _pad_slice(flat: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """`flat[start:start+length]`, zero-padded past its end (ZeRO-3 pads the last partition)."""
    out = torch.zeros(length, dtype=flat.dtype)
    end = min(start + length, flat.numel())
    if end > start:
        out[: end - start] = flat[start:end]
    return out


def _partition_rank(engine) -> tuple[int, int]:
    group = engine.optimizer.dp_process_group
    return dist.get_rank(group=group), dist.get_world_size(group=group)


@dataclass
class _Piece:
    """A contiguous run [start, start+length) of one parameter's flattened elements on one rank:
    its fp32 master value and optimizer moments (views into that rank's flat partition)."""

    start: int
    length: int
    tensors: dict[str, torch.Tensor]  # "fp32" and each moment key


class _OldZeroLayout:
    """Where each parameter's fp32 master value and optimizer moments lie in the ZeRO shards of a
    checkpoint written at `world` ranks (ZeRO 1/2: each rank holds a contiguous slice of each
    param group's flat buffer; ZeRO-3: each rank holds a ceil(numel/world) slice of every parameter)."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        optim, zmodel = {}, {}
        for n in files.names:
            m = _ZERO_FILE.match(n)
            if m:
                (optim if m["kind"] == "optim" else zmodel)[int(m["rank"])] = n
        self.world = len(optim)
        if sorted(optim) != list(range(self.world)):
            raise RuntimeError(f"checkpoint {files.where} lacks ZeRO partitions: it holds ranks {sorted(optim)}")
        self.optim_names = [optim[k] for k in range(self.world)]
        self.stage3 = bool(zmodel)
        if self.stage3 and sorted(zmodel) != list(range(self.world)):
            raise RuntimeError(f"checkpoint {files.where} lacks ZeRO-3 model states: it holds ranks {sorted(zmodel)}")
        self.zmodel_names = [zmodel[k] for k in sorted(zmodel)]
        model_name = self.zmodel_names[0] if self.stage3 else (
            META_FILE if META_FILE in files.names else next((n for n in files.names if _MODEL_FILE.match(n)), None))
        if model_name is None:
            raise RuntimeError(f"checkpoint {files.where} has no model states file")
        self.model = _ds_load(files.path(model_name))
        self.shapes: dict[str, tuple] = {}
        self.group_of: dict[str, int] = {}
        for g, shapes in enumerate(self.model["param_shapes"]):
            for name, shape in shapes.items():
                self.shapes[name], self.group_of[name] = tuple(shape), g
        self._meta: Optional[dict] = None  # ZeRO 1/2: partition sizes and offsets, from the first shard read

    # ------------------------------------------------------------------ what the shards hold
    def _optim(self, k: int) -> dict:
        return _ds_load(self.files.path(self.optim_names[k]), mmap=True)["optimizer_state_dict"]

    def _flat_state(self, osd: dict) -> tuple[list[torch.Tensor], list[dict]]:
        """The flat fp32 partitions of one shard and the optimizer state of each."""
        if self.stage3:
            return list(osd["fp32_flat_groups"]), [osd["optimizer_state_dict"]["state"][i] for i in range(len(osd["fp32_flat_groups"]))]
        base = osd["base_optimizer_state"]
        if not isinstance(base, dict):
            raise RuntimeError(f"checkpoint {self.files.where} is a DeepSpeed elastic checkpoint; only rigid ZeRO checkpoints can be re-partitioned")
        flats = list(osd["single_partition_of_fp32_groups"])
        return flats, [base["state"][g] for g in range(len(flats))]

    def _layout(self, osd: dict) -> dict:
        """ZeRO 1/2: the partition size of each group and each parameter's offset in its group's flat buffer."""
        if self._meta is None:
            flats, _ = self._flat_state(osd)
            # the saved fp32 partitions leave out the group's end padding (on the last rank): add it back
            sizes = [f.numel() + int(pad) for f, pad in zip(flats, osd.get("group_paddings") or [0] * len(flats))]
            paddings = osd.get("param_alignment_paddings")
            offsets = {}
            for g, shapes in enumerate(self.model["param_shapes"]):
                off = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    offsets[name] = off
                    off += _numel(shape) + (paddings[g][i] if paddings is not None else 0)
                if off > sizes[g] * self.world:
                    raise RuntimeError(f"checkpoint {self.files.where}: group {g} holds {off} elements in {self.world} "
                                       f"partitions of {sizes[g]}")
            self._meta = {"size": sizes, "offset": offsets}
        return self._meta

    def ranks_for(self, name: str, start: int, length: int) -> range:
        """The old ranks holding elements [start, start+length) of parameter `name`."""
        n = _numel(self.shapes[name])
        if self.stage3:
            pn = math.ceil(n / self.world)
            return range(start // pn, min((start + length - 1) // pn, self.world - 1) + 1)
        if self._meta is None:
            raise RuntimeError("read one shard (_layout) before asking where parameters lie")
        meta = self._meta
        size, off = meta["size"][self.group_of[name]], meta["offset"][name]
        return range((off + start) // size, min((off + start + length - 1) // size, self.world - 1) + 1)

    def pieces(self, k: int, osd: dict, moment_keys: Sequence[str]) -> Iterator[tuple[str, _Piece]]:
        """Every parameter's run of elements held by old rank `k` (whose optimizer file is `osd`)."""
        flats, states = self._flat_state(osd)
        keyed = [{"fp32": f, **{key: st[key] for key in moment_keys}} for f, st in zip(flats, states)]
        if self.stage3:
            bounds = [0]
            for f in flats:
                bounds.append(bounds[-1] + f.numel())
            off = 0
            for name, shape in self.shapes.items():
                n = _numel(shape)
                pn = math.ceil(n / self.world)
                i = next(j for j in range(len(flats)) if bounds[j] <= off < bounds[j + 1])
                length = min(pn, n - k * pn)
                if length > 0:
                    yield name, _Piece(k * pn, length, {key: t.narrow(0, off - bounds[i], length) for key, t in keyed[i].items()})
                off += pn
            return
        meta = self._layout(osd)
        for name, shape in self.shapes.items():
            g, n = self.group_of[name], _numel(shape)
            size, o = meta["size"][g], meta["offset"][name]
            a, b = max(0, k * size - o), min(n, (k + 1) * size - o)
            if a < b:
                yield name, _Piece(a, b - a, {key: t.narrow(0, o + a - k * size, b - a) for key, t in keyed[g].items()})

    def moments_and_step(self, osd: dict) -> tuple[list[str], Any]:
        """The optimizer's per-element state keys (e.g. exp_avg, exp_avg_sq) and its step."""
        flats, states = self._flat_state(osd)
        keys = sorted(k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() >= flats[0].numel())
        return keys, states[0].get("step")

    def frozen(self) -> dict[str, torch.Tensor]:
        """Full values of the parameters outside the optimizer (requires_grad=False)."""
        shapes = self.model.get("frozen_param_shapes") or {}
        if not shapes:
            return {}
        if not self.stage3:
            return {n: self.model["module"][n] for n in shapes}
        frags = [_ds_load(self.files.path(n)).get("frozen_param_fragments") or {} for n in self.zmodel_names]
        return {n: torch.cat([f[n].reshape(-1) for f in frags])[: _numel(s)].view(tuple(s)) for n, s in shapes.items()}

    def buffers(self) -> dict[str, torch.Tensor]:
        return {n: self.model["module"][n] for n in self.model.get("buffer_names", []) if n in self.model["module"]}


def _targets(engine, moment_keys: Sequence[str]) -> dict[str, list[_Piece]]:
    """This rank's runs of each trainable parameter in `engine` (fp32 master + moment views)."""
    opt, out = engine.optimizer, {}
    base = opt.optimizer
    if engine.zero_optimization_partition_weights():
        rank, _ = _partition_rank(engine)
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            pn = p.ds_tensor.numel()
            length = min(pn, p.ds_numel - rank * pn)
            if length <= 0:
                out[name] = []
                continue
            fp32, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False)
            views = {"fp32": fp32.narrow(0, 0, length)}
            for key in moment_keys:
                views[key] = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)[0].narrow(0, 0, length)
            out[name] = [_Piece(rank * pn, length, views)]
        return out
    for name, p in engine.module.named_parameters():
        m = getattr(p, "_hp_mapping", None)
        if not p.requires_grad:
            continue
        if m is None:
            out[name] = []
            continue
        views = {"fp32": m.hp_fragment, **{key: m.get_optim_state_fragment(key) for key in moment_keys}}
        out[name] = [_Piece(m.lp_fragment_address.start, m.lp_fragment_address.numel, views)]
    return out


@torch.no_grad()
def _reshard_into(engine, old: _OldZeroLayout) -> None:
    """Collective: set `engine`'s fp32 master partitions, Adam moments and step, frozen parameters,
    buffers and working weights from checkpoint `old` (any world size, ZeRO 1-3)."""
    where = old.files.where
    opt = engine.optimizer
    base = opt.optimizer
    stage3 = engine.zero_optimization_partition_weights()
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    if trainable != set(old.shapes):
        raise RuntimeError(f"checkpoint {where} trains parameters {sorted(set(old.shapes) - trainable)[:5]} the model lacks "
                           f"and lacks {sorted(trainable - set(old.shapes))[:5]}")
    rank, world = _partition_rank(engine)
    k0 = min(old.world - 1, rank * old.world // world)  # the old shard starting where ours starts: needed
    loaded = {k0: old._optim(k0)}
    moment_keys, step = old.moments_and_step(loaded[k0])
    if not old.stage3:
        old._layout(loaded[k0])
    for key in ("loss_scaler", "dynamic_loss_scale", "overflow"):  # fp16's loss scale (as DeepSpeed's own load)
        if key in loaded[k0] and hasattr(opt, key):
            setattr(opt, key, loaded[k0][key])
    flats = opt.fp32_partitioned_groups_flat if stage3 else opt.single_partition_of_fp32_groups
    for flat in flats:  # Adam creates its state at the first step: create it here, then fill it
        state = base.state[flat]
        for key in moment_keys:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        if step is not None:
            state["step"] = step.clone() if torch.is_tensor(step) else step
    if not stage3:
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()  # the per-parameter views into that state
    targets = _targets(engine, moment_keys)
    needed: set[int] = set()
    for name, runs in targets.items():
        for t in runs:
            needed.update(old.ranks_for(name, t.start, t.length))
    copied = {name: [0] * len(runs) for name, runs in targets.items()}
    for k in sorted(needed | {k0}):
        osd = loaded.pop(k, None) or old._optim(k)
        for name, src in old.pieces(k, osd, moment_keys):
            for i, dst in enumerate(targets.get(name, [])):
                lo, hi = max(src.start, dst.start), min(src.start + src.length, dst.start + dst.length)
                if lo >= hi:
                    continue
                for key, view in dst.tensors.items():
                    view.narrow(0, lo - dst.start, hi - lo).copy_(src.tensors[key].narrow(0, lo - src.start, hi - lo))
                copied[name][i] += hi - lo
        del osd
        old.files.release(old.optim_names[k])
    short = [n for n, runs in targets.items() for i, t in enumerate(runs) if copied[n][i] != t.length]
    if short:
        raise RuntimeError(f"checkpoint {where}: re-partitioning did not cover parameters {short[:5]} of this rank")

    frozen = old.frozen()
    params = dict(engine.module.named_parameters())
    if stage3:
        for name, p in params.items():
            if p.requires_grad:
                fp32, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False)
                p.ds_tensor.data.copy_(fp32.view_as(p.ds_tensor))
            elif name in frozen:
                pn = p.ds_tensor.numel()
                p.ds_tensor.data.copy_(_pad_slice(frozen[name].reshape(-1), rank * pn, pn).view_as(p.ds_tensor))
    else:
        opt.update_lp_params()  # working weights from the fp32 partitions (all-gather)
        for name, value in frozen.items():
            if name in params:
                params[name].data.copy_(value)
    buffers = old.buffers()
    for name, b in engine.module.named_buffers():
        if name in buffers:
            b.copy_(buffers[name])
    engine.global_steps = int(old.model.get("global_steps", engine.global_steps))
    engine.global_samples = int(old.model.get("global_samples", engine.global_samples))
    engine.skipped_steps = int(old.model.get("skipped_steps", engine.skipped_steps))
