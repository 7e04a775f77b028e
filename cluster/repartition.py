"""Re-partitioning ZeRO state: resume a DeepSpeed checkpoint at another world size or ZeRO stage.

Checkpoint files: at the world size a checkpoint was written with, rank r loads only the model
states file(s) and its own ZeRO partition (`DeepSpeedStrategy.rank_needs`): DeepSpeed's
`load_checkpoint` reads nothing else (`mp_rank_00_model_states.pt` +
`zero_pp_rank_{r}_mp_rank_00_optim_states.pt`, at ZeRO-3 `zero_pp_rank_{r}_mp_rank_00_{model,optim}_states.pt`).
At another world size `reshard_into` re-partitions: each rank copies, from the old shards that
overlap its new partition only, the fp32 master values and optimizer moments of its new partition
(any ZeRO stage 1-3 to any stage 1-3), then DeepSpeed refreshes the working weights from them;
`reshard_local` does the same for tensors partitioned like ZeRO-3 parameters (a partitioned EMA).
Under ZeRO 1/2 a resume reads `META_FILE` (DeepSpeed's module file without the weights, written
by `DeepSpeedStrategy.save`) instead of the module file.

Used by `cluster.engine.DeepSpeedStrategy` (the one place that drives DeepSpeed); nothing here
builds engines.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_\d+_(?P<kind>model|optim)_states\.pt$")
MODEL_FILE = re.compile(r"^mp_rank_\d+_model_states\.pt$")
META_FILE = "ds_model_meta.pt"  # ZeRO 1/2: DeepSpeed's module file without the parameter values (buffers kept)


class CheckpointFiles(Protocol):
    """The files of one engine's checkpoint folder, fetched on demand (`cluster.checkpoint`)."""

    names: list[str]  # file names in the folder
    where: str  # the folder's URL, for messages

    def path(self, name: str) -> str:
        """A local path of file `name` (fetched on first use)."""

    def release(self, name: str) -> None:
        """`name` is no longer needed (its local copy may go)."""


def ds_load(path: str, mmap: bool = False) -> Any:
    """A DeepSpeed checkpoint file, read with `weights_only=True` (DeepSpeed's few plain classes allowed)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def model_meta(model: dict) -> dict:
    """DeepSpeed's model states dict without the trained parameters' values (kept: shapes, buffers,
    frozen parameters, counters): what re-partitioning needs from it, a small fraction of its size."""
    keep = set(model.get("buffer_names") or []) | set(model.get("frozen_param_shapes") or {})
    out = {k: v for k, v in model.items() if k != "module"}
    out["module"] = {k: v.clone() for k, v in model["module"].items() if k in keep}
    return out


def repartitionable(engine) -> bool:
    """Whether `engine`'s optimizer is one `_reshard_into` knows (DeepSpeed's ZeRO 1/2 and ZeRO-3 optimizers)."""
    opt = getattr(engine, "optimizer", None)
    return engine.zero_optimization() and (hasattr(opt, "single_partition_of_fp32_groups")
                                           or hasattr(opt, "fp32_partitioned_groups_flat"))



def _numel(shape) -> int:
    return int(math.prod(shape))


def _pad_slice(flat: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """`flat[start:start+length]`, zero-padded past its end (ZeRO-3 pads the last partition)."""
    out = torch.zeros(length, dtype=flat.dtype)
    end = min(start + length, flat.numel())
    if end > start:
        out[: end - start] = flat[start:end]
    return out


def partition_rank(engine) -> tuple[int, int]:
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
            m = ZERO_FILE.match(n)
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
        self.model_name = self.zmodel_names[0] if self.stage3 else (
            META_FILE if META_FILE in files.names else next((n for n in files.names if MODEL_FILE.match(n)), None))
        if self.model_name is None:
            raise RuntimeError(f"checkpoint {files.where} has no model states file")
        self.model = ds_load(files.path(self.model_name))
        self.shapes: dict[str, tuple] = {}
        self.group_of: dict[str, int] = {}
        for g, shapes in enumerate(self.model["param_shapes"]):
            for name, shape in shapes.items():
                self.shapes[name], self.group_of[name] = tuple(shape), g
        self._meta: Optional[dict] = None  # ZeRO 1/2: partition sizes and offsets, from the first shard read

    # ------------------------------------------------------------------ what the shards hold
    def _optim(self, k: int) -> dict:
        return ds_load(self.files.path(self.optim_names[k]), mmap=True)["optimizer_state_dict"]

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

    def frozen_files(self) -> list[str]:
        """The files `frozen` reads besides the model file (ZeRO-3: every rank's model states)."""
        return list(self.zmodel_names) if self.stage3 and self.model.get("frozen_param_shapes") else []

    def frozen(self) -> dict[str, torch.Tensor]:
        """Full values of the parameters outside the optimizer (requires_grad=False)."""
        shapes = self.model.get("frozen_param_shapes") or {}
        if not shapes:
            return {}
        if not self.stage3:
            return {n: self.model["module"][n] for n in shapes}
        frags = [ds_load(self.files.path(n)).get("frozen_param_fragments") or {} for n in self.frozen_files()]
        return {n: torch.cat([f[n].reshape(-1) for f in frags])[: _numel(s)].view(tuple(s)) for n, s in shapes.items()}

    def buffers(self) -> dict[str, torch.Tensor]:
        return {n: self.model["module"][n] for n in self.model.get("buffer_names", []) if n in self.model["module"]}


def _targets(engine, moment_keys: Sequence[str]) -> dict[str, list[_Piece]]:
    """This rank's runs of each trainable parameter in `engine` (fp32 master + moment views)."""
    opt, out = engine.optimizer, {}
    base = opt.optimizer
    if engine.zero_optimization_partition_weights():
        rank, _ = partition_rank(engine)
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


def _first_shard(engine, old: _OldZeroLayout) -> tuple[int, dict]:
    """The old rank whose shard starts where this rank's partition starts (always needed) and its
    optimizer state (read first: under ZeRO 1/2 it gives the partition layout)."""
    rank, world = partition_rank(engine)
    k0 = min(old.world - 1, rank * old.world // world)
    osd = old._optim(k0)
    if not old.stage3:
        old._layout(osd)
    return k0, osd


def _needed(old: _OldZeroLayout, targets: dict[str, list[_Piece]]) -> set[int]:
    """The old ranks holding any element of this rank's runs `targets`."""
    return {k for name, runs in targets.items() for t in runs for k in old.ranks_for(name, t.start, t.length)}


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
    k0, first = _first_shard(engine, old)
    loaded = {k0: first}
    moment_keys, step = old.moments_and_step(first)
    for key in ("loss_scaler", "dynamic_loss_scale", "overflow"):  # fp16's loss scale (as DeepSpeed's own load)
        if key in first and hasattr(opt, key):
            setattr(opt, key, first[key])
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
    needed = _needed(old, targets) | {k0}
    copied = {name: [0] * len(runs) for name, runs in targets.items()}
    for k in sorted(needed):
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


def files_to_read(engine, files: CheckpointFiles) -> list[str]:
    """The names of `files` that `reshard_into(engine, files)` reads on this rank: the model
    states, the old shards overlapping this rank's partition (and, at ZeRO-3 with frozen
    parameters, every old rank's model states)."""
    old = _OldZeroLayout(files)
    k0, _ = _first_shard(engine, old)
    needed = _needed(old, _targets(engine, ())) | {k0}
    return list(dict.fromkeys([old.model_name, *old.frozen_files(), *(old.optim_names[k] for k in sorted(needed))]))


def reshard_into(engine, files: CheckpointFiles) -> None:
    """Collective: `engine`'s module and optimizer state from the engine checkpoint folder `files`,
    written at any world size with ZeRO 1-3 (see `_reshard_into`)."""
    _reshard_into(engine, _OldZeroLayout(files))


def _local_layout(engine, old_world: int) -> tuple[list[tuple], list[int]]:
    """Each parameter's (name, param, numel, new slice size, old slice size) and the old ranks
    overlapping this rank's ZeRO-3 slices."""
    rank, _ = partition_rank(engine)
    params = [(n, p, p.ds_numel, p.ds_tensor.numel(), math.ceil(p.ds_numel / old_world))
              for n, p in engine.module.named_parameters()]
    need: set[int] = set()
    for _, _, n, pn, old_pn in params:
        lo, hi = rank * pn, min((rank + 1) * pn, n)
        if lo < hi:
            need.update(range(lo // old_pn, (hi - 1) // old_pn + 1))
    return params, sorted(need)


def local_parts(engine, old_world: int) -> list[int]:
    """The old ranks whose slices `reshard_local` asks for on this rank."""
    return _local_layout(engine, old_world)[1]


def reshard_local(engine, old_world: int, part: Callable[[int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """This rank's ZeRO-3 slices (shaped as its parameters' `ds_tensor`) of tensors that were
    partitioned the same way over `old_world` ranks; `part(k)` gives old rank k's slices (asked
    only for the old ranks overlapping this rank's slices: `local_parts`)."""
    rank, _ = partition_rank(engine)
    params, need = _local_layout(engine, old_world)
    parts = {k: part(k) for k in need}
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
