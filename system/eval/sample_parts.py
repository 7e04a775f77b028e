"""Making, storing and merging the parts of a sampling plan (pure PyTorch; the Ray pool binds it).

Layout under a sampling job's ``out`` (local folder or s3://):
  parts/plan.json        settings that decide the parts' content; a re-run with other settings is refused
  parts/part_%05d.npz    one part: images (uint8 B x H x W x 3), labels (B,), codes (B, L); atomic writes
  samples.npz            all parts in order: arr_0 (uint8 N x H x W x 3, ADM layout), labels, codes
  grids/grid_%02d.png    first classes, one row per class
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from typing import Iterator

import numpy as np
import torch

from system.config.eval_schema import SampleConfig
from system.config import StorageConfig
from system.data.storage import exists, filesystem, join, protocol, read_bytes, storage_error, write_bytes_atomic
from system.eval.sampling_plan import Part, SamplingPlan, fingerprint, record_mismatch
from system.models.artifacts import MODEL_JSON
from system.models.artifacts import check_prefix
from system.sampling.generators import load_pair

PARTS = "parts"
PLAN_JSON = "plan.json"
SAMPLES_NPZ = "samples.npz"


def part_url(out: str, index: int) -> str:
    return join(out, PARTS, f"part_{index:05d}.npz")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) (ADM npz layout)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def export_classes(export_url: str, storage: StorageConfig | None = None) -> int:
    """The class count of the generator an export holds (what class-conditional sampling draws from)."""
    from system.models.artifacts import model_part

    return int(model_part(export_url, "ar", storage)["config"]["num_classes"])


def plan_record(cfg: SampleConfig, num_classes: int, storage: StorageConfig | None = None) -> dict:
    """The settings that decide the parts' content (plus the export's model.json hash)."""
    model_json = read_bytes(join(cfg.export_url, MODEL_JSON), storage)
    return {
        "export_url": cfg.export_url.rstrip("/"), "model_json": fingerprint({"m": model_json.decode()}), "ema": cfg.ema,
        "num_per_class": cfg.num_per_class, "num_classes": num_classes, "part_size": cfg.batch_size, "seed": cfg.seed,
        "cfg_scale": cfg.cfg_scale, "cfg_schedule": cfg.cfg_schedule, "cfg_power": cfg.cfg_power,
        "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "precision": cfg.precision,
    }


def claim_out(out: str, record: dict, storage: StorageConfig | None = None) -> None:
    """Write parts/plan.json, or check that the one there has the same settings."""
    url = join(out, PARTS, PLAN_JSON)
    if exists(url, storage):
        old = json.loads(read_bytes(url, storage))
        diff = record_mismatch(old, record)
        if diff:
            raise ValueError(
                f"{out} holds parts made with other settings ({'; '.join(diff)}); "
                f"use another out= or delete {join(out, PARTS)}"
            )
        return
    write_bytes_atomic(url, json.dumps(record, indent=1, sort_keys=True).encode(), storage)


def finished_parts(out: str, plan: SamplingPlan, storage: StorageConfig | None = None) -> set[int]:
    """Indices of the plan's parts already written under ``out``."""
    try:
        fs, root = filesystem(join(out, PARTS), storage)
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.exists(root) else set()
    except Exception as e:  # noqa: BLE001
        raise storage_error(join(out, PARTS), storage, e) from e
    return {i for i in range(plan.num_parts) if f"part_{i:05d}.npz" in names}


def encode_part(part: Part, images: np.ndarray, codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=np.asarray(part.labels, np.int64), codes=codes,
             index=np.int64(part.index), seed=np.uint64(part.seed))
    return buf.getvalue()


def read_part(out: str, part: Part, storage: StorageConfig | None = None) -> dict[str, np.ndarray]:
    url = part_url(out, part.index)
    with np.load(io.BytesIO(read_bytes(url, storage))) as f:
        data = {k: f[k] for k in f.files}
    if data["images"].shape[0] != part.size or data["labels"].tolist() != list(part.labels):
        raise ValueError(f"{url} does not match part {part.index} of the plan (labels or size differ); delete it and re-run")
    return data


class PartSampler:
    """Loads an export (any registered tokenizer + generator kinds) once; makes parts: generate
    codes (KV cache, CFG) -> decode -> uint8."""

    def __init__(self, cfg: SampleConfig, device: str | torch.device | None = None):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, self.generator = load_pair(cfg.export_url, cfg.storage, ema=cfg.ema, device=self.device)
        check_prefix(self.generator.prefix_tokens, self.tokenizer.prefix_tokens, f"the AR model of {cfg.export_url}")
        if cfg.compile:
            self.generator.compile_sampling("reduce-overhead" if self.device.type == "cuda" else "default")

    @torch.no_grad()
    def sample(self, part: Part) -> tuple[np.ndarray, np.ndarray]:
        """-> (uint8 images (B, H, W, 3), codes (B, L))."""
        c = self.cfg
        labels = torch.tensor(part.labels, dtype=torch.long, device=self.device)
        bf16 = c.precision == "bf16" and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            codes = self.generator.sample(
                labels, cfg_scale=c.cfg_scale, cfg_schedule=c.cfg_schedule, cfg_power=c.cfg_power,
                temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, seed=part.seed,
            )
            images = self.tokenizer.decode(codes)
        dtype = np.int16 if self.generator.vocab_size <= np.iinfo(np.int16).max else np.int32
        return to_uint8(images), codes.cpu().numpy().astype(dtype)

    def write_part(self, part: Part, out: str) -> int:
        """Make ``part`` and store it atomically under ``out``; returns its number of images."""
        images, codes = self.sample(part)
        write_bytes_atomic(part_url(out, part.index), encode_part(part, images, codes), self.cfg.storage)
        return part.size


def iter_parts(out: str, plan: SamplingPlan, storage: StorageConfig | None = None) -> Iterator[dict[str, np.ndarray]]:
    for part in plan.parts():
        if not exists(part_url(out, part.index), storage):
            raise FileNotFoundError(f"{part_url(out, part.index)} is missing; re-run the sampling job to make it")
        yield read_part(out, part, storage)


def _write_array(zf: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype, chunks: Iterator[np.ndarray]) -> None:
    """Stream one .npy member into an npz (never holds the whole array)."""
    with zf.open(f"{name}.npy", "w", force_zip64=True) as w:
        np.lib.format.write_array_header_2_0(w, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": shape})
        for chunk in chunks:
            w.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def merge_parts(out: str, plan: SamplingPlan, storage: StorageConfig | None = None) -> str:
    """All parts, in order, -> ``<out>/samples.npz`` (arr_0, labels, codes); returns its URL."""
    first = read_part(out, plan.part(0), storage)
    h, w, _ = first["images"].shape[1:]
    n = plan.total
    url = join(out, SAMPLES_NPZ)
    local = protocol(url) == "file"
    folder = os.path.dirname(os.path.abspath(url)) if local else None
    fd, tmp = tempfile.mkstemp(prefix=".samples-", suffix=".npz", dir=folder)
    os.close(fd)
    codes: list[np.ndarray] = []  # small (N x L ints): kept while the images stream through

    def images() -> Iterator[np.ndarray]:
        for p in iter_parts(out, plan, storage):
            if p["images"].shape[1:] != (h, w, 3):
                raise ValueError(f"part {int(p['index'])} has images {p['images'].shape[1:]}, part 0 has {(h, w, 3)}")
            codes.append(p["codes"])
            yield p["images"]

    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_array(zf, "arr_0", (n, h, w, 3), np.uint8, images())
            zf.writestr("labels.npy", _npy_bytes(plan.labels()))
            zf.writestr("codes.npy", _npy_bytes(np.concatenate(codes)))
        if local:
            os.replace(tmp, url)
        else:
            fs, path = filesystem(url, storage)
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return url


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_grids(out: str, plan: SamplingPlan, num_classes: int, cols: int, storage: StorageConfig | None = None,
                rows_per_grid: int = 8) -> list[str]:
    """PNG grids of the first ``num_classes`` classes (one row of up to ``cols`` images per class)."""
    from system.train_utils import save_image_grid

    classes = min(num_classes, plan.num_classes)
    rows: dict[int, list[np.ndarray]] = {c: [] for c in range(classes)}
    for part in plan.parts():
        if all(len(r) >= min(cols, plan.num_per_class) for r in rows.values()):
            break
        data = read_part(out, part, storage)
        for img, lab in zip(data["images"], data["labels"].tolist()):
            if lab in rows and len(rows[lab]) < cols:
                rows[lab].append(img)
    urls = []
    for g, first in enumerate(range(0, classes, rows_per_grid)):
        tensors = [torch.from_numpy(np.stack(rows[c])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                   for c in range(first, min(first + rows_per_grid, classes))]
        buf = io.BytesIO()
        save_image_grid(tensors, buf)
        url = join(out, "grids", f"grid_{g:02d}.png")
        write_bytes_atomic(url, buf.getvalue(), storage)
        urls.append(url)
    return urls
