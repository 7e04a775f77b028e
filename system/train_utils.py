"""Pure pieces of a training loop: LR schedule, EMA, RNG state capture/restore, seeding,
determinism flags and a PNG image-grid writer. No Ray, DeepSpeed or process-group code here."""
from __future__ import annotations

import math
import os
import random
import sys
from typing import Iterable, Mapping, Optional

import numpy as np
import torch


# ----------------------------------------------------------------------------- LR schedule
def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based: the step about to run).

    Linear warmup from 1/warmup to 1 over `warmup_steps`, then `cosine` decay to `min_ratio`
    at `max_steps` (or `constant`). A pure function of `step`, so a resumed run gets the same LR.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown LR schedule {schedule!r}; expected 'cosine' or 'constant'")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(max_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of named tensors, kept in fp32 (shadow = decay*shadow + (1-decay)*x).

    The caller decides which tensors are tracked (full parameters, or a rank's ZeRO-3 partitions)
    and passes the current ones to `update`; `swap` exchanges shadow and live values in place.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in tensors.items()}

    def warmup_decay(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (1-based), warmed up so a short run
        still gets a useful EMA: min(decay, (1 + step) / (10 + step))."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor], decay: Optional[float] = None) -> None:
        d = self.decay if decay is None else decay
        for k, v in tensors.items():
            self.shadow[k].lerp_(v.detach().float(), 1.0 - d)

    @torch.no_grad()
    def swap(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Exchange the values of `tensors` and the shadow (call twice to undo)."""
        for k, v in tensors.items():
            live = v.detach().float().clone()
            v.copy_(self.shadow[k].to(v.dtype))
            self.shadow[k].copy_(live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in state.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"EMA state for {k!r} has shape {tuple(v.shape)}, model has {tuple(self.shadow[k].shape)}")
            self.shadow[k].copy_(v)


# ----------------------------------------------------------------------------- RNG / seeding
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(cuda: bool = False) -> None:
    """Deterministic kernels (bit-exact resume on CPU; on GPU, as deterministic as cuDNN allows).
    Uninitialised memory is not NaN-filled: that costs seconds per step with large communication
    buckets and changes no result of a correct program."""
    torch.utils.deterministic.fill_uninitialized_memory = False
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        use_deterministic_algorithms(warn_only=True)
    else:
        use_deterministic_algorithms()


def use_deterministic_algorithms(warn_only: bool = False) -> None:
    """`torch.use_deterministic_algorithms(True)`, whose other effect, inductor's `deterministic`
    flag, it sets by importing torch._inductor: 3-4 s in every rank process on 2 cores, for a
    compiler most runs never load. Until inductor is loaded, the flag goes through the variable its
    config reads at import (tests/system/test_train_utils.py checks both paths agree with torch's)."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        return
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1"
    torch._C._set_deterministic_algorithms(True, warn_only=warn_only)


def capture_rng_state() -> dict:
    """RNG states of torch (CPU and every CUDA device), numpy and python, as tensors/ints only
    (so `torch.load(weights_only=True)` can read it back)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(f"RNG state holds {len(cuda)} CUDA devices, this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- image grid
def image_grid(rows: Iterable[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Rows of images in [-1, 1], each (N, C, H, W) with C in {1, 3}, -> uint8 (H', W', 3).
    Rows may hold different counts; missing cells stay black."""
    rows = [r.detach().float().cpu() for r in rows]
    if not rows:
        raise ValueError("image_grid needs at least one row of images")
    h = max(r.shape[-2] for r in rows)
    w = max(r.shape[-1] for r in rows)
    cols = max(r.shape[0] for r in rows)
    out = np.zeros((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        if row.ndim != 4 or row.shape[1] not in (1, 3):
            raise ValueError(f"grid row {i} must be (N, 1|3, H, W), got {tuple(row.shape)}")
        img = ((row.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        img = img.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
        for j, im in enumerate(img):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + im.shape[0], x : x + im.shape[1]] = im
    return out


def save_image_grid(rows: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], path_or_file, pad: int = 2,
                    title: str = "") -> None:
    """Write a PNG grid (one row per entry, in order) to a path or a binary file object. Named rows
    (a mapping) get their name as a label on the left ("ar_sample" -> "ar sample"), and `title`
    a line above the grid. Small images are upscaled (nearest) to at least 96 px for viewing."""
    from PIL import Image, ImageDraw, ImageFont

    named = isinstance(rows, Mapping)
    values = list(rows.values()) if named else list(rows)
    grid = Image.fromarray(image_grid(values, pad))
    side = max(max(v.shape[-2] for v in values), 1)
    scale = max(1, -(-96 // side))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if not named and not title:
        grid.save(path_or_file, format="PNG")
        return
    font = ImageFont.load_default(size=14)
    labels = [str(k).replace("_", " ") for k in rows] if named else []
    left = 8 + max((int(font.getlength(t)) for t in labels), default=0) + (8 if labels else 0)
    top = 24 if title else 0
    canvas = Image.new("RGB", (grid.width + left, grid.height + top), (255, 255, 255))
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((8, 4), title, fill=(0, 0, 0), font=font)
    row_h = grid.height / max(len(values), 1)
    for i, t in enumerate(labels):
        draw.text((8, top + (i + 0.5) * row_h), t, fill=(0, 0, 0), font=font, anchor="lm")
    canvas.save(path_or_file, format="PNG")
