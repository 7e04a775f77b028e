"""One training step of a method traced with fake tensors: no memory, no GPU, no weights.

`build_fake(cls, cfg, data, world_size)` constructs the method and its trainable modules under
`FakeTensorMode` and plan mode (system/models/weights.py: weights from paths and exports are not
read, their references recorded). `trace_step` then runs what the rank loop runs for one micro-batch
(cluster/loop.py): for each phase, the method's step with every other module frozen under the
configured autocast, backward, the optimiser step's gradient release, the phase's aux carried to the
next; under `Meter`, which counts FLOPs (torch's formulas) and the activation peak.

Device: the fake tensors live on the CPU and bf16 runs as CPU autocast. A CPU-only torch cannot
run CUDA kernels even on fake tensors (autocast("cuda") disables itself without CUDA, and some
kernels' device guards abort the process), and the memory of a step does not depend on it
beyond the autocast op lists (CPU's and CUDA's agree on the matmuls and convolutions that dominate).

`Meter` is a small TorchDispatchMode: every storage an op creates is counted when made and
uncounted when freed (a weakref finalizer on the storage); tensors that exist before the trace
(weights, buffers) are not counted, gradients are marked as such so the memory model can count
them its own way (full until the step under ZeRO 0/1, reduced into buckets under ZeRO 2/3).
"""
from __future__ import annotations

import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from system.methods.base import Collective, Method, ModuleSpec, frozen
from system.models import weights


class PlanCollective(Collective):
    """Rank 0 of `world_size` ranks with the shapes of the real collectives (values are fake)."""

    def __init__(self, world_size: int):
        self.rank, self.world_size = 0, int(world_size)

    def all_gather(self, t: Tensor) -> Tensor:
        return torch.cat([t] * self.world_size)


def _tensors(items) -> Iterator[Tensor]:
    """The tensors among `items` and in its lists / tuples (an op's arguments or outputs)."""
    for a in items:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, Tensor))


class Meter(TorchDispatchMode):
    """FLOPs of the ops inside (`flops`) and the bytes of the storages they create, over time (module
    doc). Not torch's FlopCounterMode: its module tracking keeps activations alive until backward,
    which hides what activation checkpointing frees (10.2 GiB instead of 1.2 for alitok-b at batch 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0.0
        self._formulas = flop_formulas()
        self.events: list[tuple[int, int]] = []  # (storage key, +bytes when made | -bytes when freed)
        self._keys: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
        self._next = 0
        self.grads: set[int] = set()  # keys of storages that became parameter gradients
        self.params: dict[int, int] = {}  # storage key (negative) of a pre-existing tensor -> numel
        self.read: set[int] = set()  # keys of pre-existing tensors an op read

    def known(self, tensors: Iterator[Tensor]) -> None:
        """Tensors that exist before the trace (weights, buffers): not counted, their reads recorded."""
        for t in tensors:
            st = t.untyped_storage()
            if st not in self._keys:
                self._next += 1
                self._keys[st] = -self._next
                self.params[-self._next] = t.numel()

    def key(self, t: Tensor) -> Optional[int]:
        return self._keys.get(t.untyped_storage())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        keys = self._keys
        for t in _tensors(args):
            k = keys.get(t.untyped_storage())
            if k is not None and k < 0:
                self.read.add(k)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        for t in _tensors(out if isinstance(out, (tuple, list)) else (out,)):
            st = t.untyped_storage()
            if st not in keys:
                self._next += 1
                key, nbytes = self._next, _nbytes(st)
                keys[st] = key
                self.events.append((key, nbytes))
                weakref.finalize(st, self.events.append, (key, -nbytes))
        return out

    def live(self) -> int:
        """Bytes of the storages made inside that are alive now."""
        return sum(delta for _, delta in self.events)

    def peak(self, exclude: frozenset[int] | set[int] = frozenset(), start: int = 0) -> int:
        """The largest sum of live bytes over the trace from event `start` on (what was alive before
        is not counted), not counting the storages `exclude`."""
        born = {key for key, delta in self.events[:start] if delta > 0}
        live = peak = 0
        for key, delta in self.events[start:]:
            if key not in exclude and key not in born:
                live += delta
                peak = max(peak, live)
        return peak


@dataclass
class ModuleParams:
    """One trained module's parameters as the engine holds them, and what the traced step used."""

    trainable: int  # requires_grad at engine set-up: in the optimiser
    frozen: int  # parameters of the module that are not trained (ZeRO-3 still partitions them)
    buffer_bytes: int
    used_trainable: int  # received a gradient in the traced step
    used_frozen: int  # frozen and read by an op
    largest_layer: int  # most parameters held directly by one submodule (a ZeRO-3 gather)
    small: int  # parameters in tensors under 1e5 elements (ZeRO-3 keeps them whole: param_persistence_threshold)
    comm_dtypes: int  # gradient communication dtypes under bf16 autocast (Linear/Conv weights bf16, others fp32)
    ema: bool


@dataclass
class StepTrace:
    """What `trace_step` measured for one micro-batch of every phase."""

    flops: float
    flops_by_phase: dict[str, float]
    activation_peak: int  # bytes, gradients not counted
    peak_with_grads: int  # bytes, each phase's gradients live until its step
    modules: dict[str, ModuleParams]
    frozen_params: int  # parameters of the method's frozen helpers
    frozen_used: int  # ... read by an op in the step
    frozen_bytes: int  # their weights and buffers
    weights: list[dict] = field(default_factory=list)  # WeightRef.as_dict() of every weight source a run reads
    seconds: float = 0.0


def flop_formulas() -> dict:
    """torch's FLOP formulas by op (torch.utils.flop_counter's registry), plus the CPU flash-attention
    kernels the fake trace runs (torch has the CUDA ones only; causal attention counted in full, as
    system/models/flops.py does)."""
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    def fwd(query, key, value, *args, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    def bwd(grad_out, query, key, value, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

    aten = torch.ops.aten
    return {**flop_registry, aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def _unique(tensors) -> list[Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _largest_layer(module: nn.Module) -> int:
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


def _comm_dtypes(module: nn.Module) -> int:
    lower = {id(m.weight) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    kinds = {id(p) in lower for p in module.parameters() if p.requires_grad}
    return max(len(kinds), 1)


@dataclass
class FakeMethod:
    """A method and its modules built under FakeTensorMode + plan mode (`build_fake`)."""

    method: Method
    specs: dict[str, ModuleSpec]
    mode: Any  # the FakeTensorMode they live in (trace inside it)
    weights: list[dict]
    seconds: float


@contextmanager
def fake_build() -> Iterator[None]:
    """Building modules on fake tensors (plan-only; global patches, restored on exit): `torch.nn.init`'s
    initialisers return their tensor untouched (also where torch modules and transformers imported
    them: fake weights have no values, and some initialisers branch on them, trunc_normal_'s
    `mask.any()`), and `Module.to` to where the module already is returns it (torch swaps FakeTensor
    parameters on conversion, which fails while the fake mode holds weak references to them)."""
    import importlib
    import sys

    import torch.nn.init as init

    try:  # transformers copies the initialisers once, at import: import it before they are replaced
        table = importlib.import_module("transformers.initialization").TORCH_INIT_FUNCTIONS
    except (ImportError, AttributeError):
        table = {}
    originals = {n: getattr(init, n) for n in dir(init) if n.endswith("_") and not n.startswith("_")}

    def keep(tensor, *args, **kwargs):
        return tensor

    patched = []
    for mod in [init, *(m for name, m in list(sys.modules.items()) if name.startswith("torch.nn.modules.") and m)]:
        for n, f in originals.items():
            if getattr(mod, n, None) is f:
                patched.append((mod, n, f))
                setattr(mod, n, keep)
    saved = dict(table)
    table.update({k: keep for k in table})
    module_to = nn.Module.to

    def to(self, *args, **kwargs):  # fake parameters cannot be swapped (torch swaps FakeTensor parameters)
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = list(self.parameters()) + list(self.buffers())
        if all((device is None or t.device.type == torch.device(device).type) and (dtype is None or t.dtype == dtype
               or not t.is_floating_point()) for t in tensors):
            return self
        return module_to(self, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = module_to
        for mod, n, f in patched:
            setattr(mod, n, f)
        table.update(saved)


def fake_mode():
    """A FakeTensorMode that takes real inputs (constants made before the trace) and data-dependent
    output shapes (torch.unique of VAπ's group ids: a symbolic size, its bytes counted as 0)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())


def _nbytes(st: Any) -> int:
    n = st.nbytes()
    if isinstance(n, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(n, fallback=0))
    return int(n)


def build_fake(cls: type[Method], cfg: Any, data: Any, world_size: int = 1) -> FakeMethod:
    """`cls(cfg, data)` and its `modules()` on fake tensors, no weight read (module doc)."""
    t0 = time.perf_counter()
    mode = fake_mode()
    with weights.planning() as refs, mode, fake_build():
        method = cls(cfg, data)
        method.collective = PlanCollective(world_size)
        specs = method.modules()
        phases = list(method.phases())
    unknown = [p for p in phases if p not in specs]
    if unknown or not phases:
        raise ValueError(f"{cls.__name__}.phases() = {phases} must name modules of modules() = {sorted(specs)}")
    return FakeMethod(method, specs, mode, [r.as_dict() for r in refs], time.perf_counter() - t0)


def autocast_for(precision: str) -> Callable[[], Any]:
    """The forward context of the loop's engines: bf16 autocast (module doc: on the CPU) or none."""
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext


@contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def trace_step(fm: FakeMethod, make_batch: Callable[[], Any], precision: str, step: int) -> StepTrace:
    """One micro-batch of every phase of `fm`'s method, as the rank loop runs it (module doc)."""
    t0 = time.perf_counter()
    method, specs = fm.method, fm.specs
    mods = {n: s.module for n, s in specs.items()}
    helpers = method.frozen_parts()
    trained = {id(p) for m in mods.values() for p in m.parameters()}
    helper_params = _unique(p for h in helpers for p in h.parameters() if id(p) not in trained)
    helper_buffers = _unique(b for h in helpers for b in h.buffers())
    info = {n: (_unique(m.parameters()), _unique(m.buffers())) for n, m in mods.items()}
    requires = {n: [p.requires_grad for p in ps] for n, (ps, _) in info.items()}
    tracker = Meter()
    got_grad: set[int] = set()
    by_phase: dict[str, float] = {}
    autocast = autocast_for(precision)
    with fm.mode, _quiet():
        for m in mods.values():
            m.train()
        tracker.known(t for ps, bs in info.values() for t in ps + bs)
        tracker.known(iter(helper_params + helper_buffers))
        with tracker:
            batch = make_batch()
            carry: dict = {}
            for phase in method.phases():
                before = tracker.flops
                with frozen(*(m for n, m in mods.items() if n != phase)), autocast():
                    out = method.step(phase, mods, batch, step, carry)
                out.loss.backward()
                for p in mods[phase].parameters():  # the engine's step: gradients reduced and released
                    if p.grad is not None:
                        got_grad.add(id(p))
                        key = tracker.key(p.grad)
                        if key is not None:
                            tracker.grads.add(key)
                        p.grad = None
                carry.update(out.aux)
                by_phase[phase] = tracker.flops - before
                del out
            del batch, carry
    read = tracker.read
    modules = {}
    for n, (ps, bs) in info.items():
        trainable = sum(p.numel() for p, r in zip(ps, requires[n]) if r)
        modules[n] = ModuleParams(
            trainable=trainable, frozen=sum(p.numel() for p in ps) - trainable, buffer_bytes=_bytes(bs),
            used_trainable=sum(p.numel() for p in ps if id(p) in got_grad),
            used_frozen=sum(p.numel() for p, r in zip(ps, requires[n]) if not r and tracker.key(p) in read),
            largest_layer=_largest_layer(mods[n]), small=sum(p.numel() for p in ps if p.numel() < 100_000),
            comm_dtypes=_comm_dtypes(mods[n]), ema=specs[n].ema_decay > 0)
    return StepTrace(
        flops=tracker.flops, flops_by_phase=by_phase, activation_peak=tracker.peak(tracker.grads),
        peak_with_grads=tracker.peak(), modules=modules, frozen_params=sum(p.numel() for p in helper_params),
        frozen_used=sum(p.numel() for p in helper_params if tracker.key(p) in read),
        frozen_bytes=_bytes(helper_params) + _bytes(helper_buffers), weights=list(fm.weights),
        seconds=time.perf_counter() - t0)
