"""Autoregressive sampling with a static KV cache and classifier-free guidance.

Per image: one ``prefill`` (class token) and N-1 ``decode_one`` steps. Eager
steps get their position on the host, so attention reads only the filled part
of the cache (flash-attn's KV-cache kernel on the GPU when usable); a
``decode_fn`` gets it on the device, a fixed-shape graph (no data-dependent
Python control flow), so ``torch.compile(model.decode_one)`` captures it once. CFG runs the batch
doubled as [cond; null class] and mixes logits as u + s * (c - u), with the
scale s following a schedule over the N steps. ``BucketedDecoder`` is a
``decode_fn`` that reads only the filled part of the cache, optionally compiled
and replayed as CUDA graphs (bench/gpu.py times it).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

SCHEDULES = ("constant", "linear", "power-cosine")


def cfg_scale_at(step: int, n_steps: int, scale: float, schedule: str = "constant", power: float = 1.0) -> float:
    """Guidance scale at ``step`` of ``n_steps`` (ratio r = step / n_steps).

    constant: s; linear: 1 + (s - 1) r; power-cosine (AliTok / RAR): 1 + (s - 1) (1 - cos(pi r^power)) / 2.
    """
    r = step / n_steps
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * r
    if schedule == "power-cosine":
        return 1.0 + (scale - 1.0) * (1.0 - math.cos(math.pi * r**power)) / 2.0
    raise ValueError(f"unknown CFG schedule {schedule!r}; expected one of {SCHEDULES}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf; (..., V) -> (..., V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = (cum - srt.softmax(-1)) >= top_p  # keep tokens until the mass before them reaches p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """(..., V) logits -> (...) ids. temperature 0 is greedy. Uses the exponential race
    argmax(p / E), E ~ Exp(1), which samples from p without a data-dependent multinomial."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def guide(logits: Tensor, scale: float | Tensor, cfg: bool) -> Tensor:
    """Doubled-batch logits (2B, V) -> guided (B, V); identity when cfg is off."""
    if not cfg:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def generate(
    model,
    labels: Tensor,
    cfg_scale: float = 1.0,
    schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    *,
    cfg_power: float = 1.0,
    num_tokens: int | None = None,
    codebook: Tensor | None = None,
    use_cache: bool = True,
    decode_fn: Callable | None = None,
) -> Tensor:
    """Sample token sequences (B, N) for class ``labels`` (B,).

    ``use_cache=False`` recomputes the full sequence every step (reference /
    benchmark). ``decode_fn`` replaces ``model.decode_one`` (e.g. a compiled one).
    CFG is on when cfg_scale != 1 or the schedule is not constant.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown CFG schedule {schedule!r}; expected one of {SCHEDULES}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=labels.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    cfg = model.cfg
    n = num_tokens or cfg.seq_len
    b = labels.shape[0]
    use_cfg = cfg_scale != 1.0
    lab = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if use_cfg else labels
    out = torch.zeros(b, n, dtype=torch.long, device=labels.device)

    def pick(logits: Tensor, i: int) -> Tensor:
        s = cfg_scale_at(i, n, cfg_scale, schedule, cfg_power)
        return sample_logits(guide(logits, s, use_cfg), temperature, top_k, top_p, generator)

    if use_cache:
        decode = decode_fn or model.decode_one
        model.setup_cache(lab.shape[0], cfg.cls_token_num + n)
        # model.decode_one reads host positions without a sync (only the filled cache is attended to);
        # a decode_fn (compiled, CUDA graphs) takes device positions and fixed shapes
        where = labels.device if decode_fn is not None else "cpu"
        positions = torch.arange(cfg.cls_token_num, cfg.cls_token_num + n, device=where)
        try:
            logits = model.prefill(lab)
            for i in range(n):
                tok = pick(logits, i)
                out[:, i] = tok
                if i + 1 < n:
                    inp = torch.cat([tok, tok]) if use_cfg else tok
                    logits = decode(inp[:, None], positions[i : i + 1], lab, codebook)
        finally:
            model.clear_cache()
    else:
        for i in range(n):
            prev = out[:, :i]
            prev = torch.cat([prev, prev]) if use_cfg else prev
            out[:, i] = pick(model.next_logits(prev, lab, codebook), i)
    model.train(was_training)
    return out


@torch.no_grad()
def cached_logits(model, labels: Tensor, tokens: Tensor, codebook: Tensor | None = None,
                  decode_fn: Callable | None = None) -> Tensor:
    """Teacher-forced KV-cache pass: the logits (B, N, V) ``generate``'s cached steps give at every
    position of ``tokens`` (B, N) for ``labels`` (B,) (``prefill``, then ``decode_one`` on each
    token; a CFG batch is simply passed doubled). For checking the cached paths against each other."""
    was_training = model.training
    model.eval()
    n0, (b, n) = model.cfg.cls_token_num, tokens.shape
    decode = decode_fn or model.decode_one
    positions = torch.arange(n0, n0 + n, device=labels.device if decode_fn is not None else "cpu")
    model.setup_cache(b, n0 + n)
    try:
        out = [model.prefill(labels)]
        for i in range(n - 1):
            out.append(decode(tokens[:, i : i + 1], positions[i : i + 1], labels, codebook))
    finally:
        model.clear_cache()
    model.train(was_training)
    return torch.stack(out, dim=1)


def _mark_dynamic(t: Tensor, *dims: int) -> None:
    for d in dims:
        if t.shape[d] > 1:  # sizes 0 and 1 are always specialised
            torch._dynamo.maybe_mark_dynamic(t, d)  # a hint: no error if the trace must specialise it


class BucketedDecoder:
    """A ``decode_fn`` for :func:`generate` that reads only the filled part of the KV cache,
    optionally compiled and replayed as CUDA graphs.

    With device positions (what ``generate`` hands a ``decode_fn``) and without flash-attn,
    ``model.decode_one`` attends over the whole static cache (later positions masked), so every
    step reads ``max_len`` positions of K/V. Here each layer's cache is a view of the first
    positions of one persistent buffer, rounded up to a multiple of ``bucket`` (0: the whole
    cache): the same values, at most ``bucket - 1`` unused positions read.

    ``compile_mode`` wraps ``decode_one`` in ``torch.compile`` (e.g. "default"), with the cache
    length and batch dynamic: one compile serves every bucket and batch size. ``cuda_graph=True``
    captures one CUDA graph per bucket on first use (after two warm-up calls on a side stream,
    which also compile) and replays it afterwards. The persistent cache and the graphs are kept
    across ``generate`` calls with the same batch (``release()`` frees them).

    Call it the way ``generate`` does: after ``prefill``, once per position ``cls_token_num``,
    ``cls_token_num + 1``, ...; a new ``model.setup_cache`` starts a new sequence.
    """

    def __init__(self, model, bucket: int = 32, compile_mode: str | None = None, cuda_graph: bool = False):
        self.model, self.bucket, self.cuda_graph = model, bucket, cuda_graph
        self._compiled = None if compile_mode is None else torch.compile(model.decode_one, mode=compile_mode, fullgraph=True)
        self.graphs: dict[int, tuple] = {}  # view length -> (CUDAGraph, its static logits)
        self._caches: list | None = None  # the cache modules kept and re-installed into the model
        self._full: list[tuple[Tensor, Tensor]] = []  # per layer (k, v) over max_len positions
        self._pool = self._static = self._codebook = self._seen = self._next = self._len = self._side = None

    def release(self) -> None:
        """Drop the persistent cache and the CUDA graphs."""
        self.graphs.clear()
        self._caches, self._full = None, []
        self._pool = self._static = self._codebook = self._seen = self._len = None

    def fn(self, token: Tensor, pos: Tensor, labels: Tensor, codebook: Tensor | None = None) -> Tensor:
        """One decode step on the current cache views (compiled when a compile mode was given)."""
        if self._compiled is None:
            return self.model.decode_one(token, pos, labels, codebook)
        _mark_dynamic(token, 0)
        _mark_dynamic(labels, 0)
        # cache buffers live on modules, which dynamo otherwise compiles with static shapes
        with torch._dynamo.config.patch(force_nn_module_property_static_shapes=False, force_parameter_static_shapes=False):
            return self._compiled(token, pos, labels, codebook)

    def _start(self, caches: list) -> None:
        """A new sequence: the first cache set is kept; later ones have their prefilled positions copied in."""
        n0 = self.model.cfg.cls_token_num
        if self._caches is not None and len(caches) == len(self._caches) and all(
            c.k.shape == k.shape and c.k.dtype == k.dtype and c.k.device == k.device for c, (k, _) in zip(caches, self._full)
        ):
            for c, (k, v) in zip(caches, self._full):
                k[:, :, :n0].copy_(c.k[:, :, :n0])
                v[:, :, :n0].copy_(c.v[:, :, :n0])
            self.model._caches = self._caches  # the same modules every sequence: no recompiles, graphs stay valid
        else:
            self.release()
            self._caches, self._full = caches, [(c.k, c.v) for c in caches]
        self._seen, self._next, self._len = self.model._caches, n0, None

    def _set_len(self, n: int) -> None:
        for c, (k, v) in zip(self._caches, self._full):
            c.k, c.v = k[:, :, :n], v[:, :, :n]
            if self._compiled is not None:
                _mark_dynamic(c.k, 0, 2)
                _mark_dynamic(c.v, 0, 2)
        self._len = n

    def __call__(self, token: Tensor, pos: Tensor, labels: Tensor, codebook: Tensor | None = None) -> Tensor:
        if self.model._caches is None:
            raise RuntimeError("no KV cache: call model.setup_cache(batch) and prefill before decoding")
        if self.model._caches is not self._seen:
            self._start(self.model._caches)
        p, self._next = self._next, self._next + 1
        max_len = self._full[0][0].shape[2]
        n = min(max_len, -(-(p + 1) // self.bucket) * self.bucket) if self.bucket else max_len
        if n != self._len:
            self._set_len(n)
        if not self.cuda_graph:
            if not pos.is_cuda and int(pos[0]) != p:
                raise RuntimeError(f"decode called at position {int(pos[0])}; expected {p}, the next one")
            return self.fn(token, pos, labels, codebook)
        return self._replay(n, token, pos, labels, codebook)

    def _replay(self, n: int, token: Tensor, pos: Tensor, labels: Tensor, codebook: Tensor | None) -> Tensor:
        if self._static is None or self._static[0].shape != token.shape or codebook is not self._codebook:
            self.graphs.clear()
            self._static, self._codebook = (token.clone(), pos.clone(), labels.clone()), codebook
        for dst, src in zip(self._static, (token, pos, labels)):
            dst.copy_(src)
        if n not in self.graphs:
            dev = token.device
            self._side = self._side or torch.cuda.Stream(dev)
            self._side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(self._side):  # compile and warm up outside the capture; rewrites this step's k/v
                for _ in range(2):
                    self.fn(*self._static, codebook)
            torch.cuda.current_stream(dev).wait_stream(self._side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):  # one memory pool for all buckets, replayed in order
                out = self.fn(*self._static, codebook)
            if self._pool is None:
                self._pool = graph.pool()
            self.graphs[n] = (graph, out)
        graph, out = self.graphs[n]
        graph.replay()
        return out
