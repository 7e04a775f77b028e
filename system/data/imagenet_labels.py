"""ImageNet's validation labels as users have them, for a flat `val/` folder (jobs/make_shards.py).

`read_val_labels(path, classes)` -> {image stem: class index}, from any of:

- Kaggle's `LOC_val_solution.csv` (ImageNet Object Localization Challenge): a header
  `ImageId,PredictionString`, then `ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...`: the
  image id and its boxes, each starting with the class's wnid.
- the devkit's `ILSVRC2012_validation_ground_truth.txt` (ILSVRC2012_devkit_t12/data/): line i is
  the ILSVRC2012_ID (1..1000) of `ILSVRC2012_val_{i:08d}.JPEG`. The IDs are the devkit's own
  order, not the sorted wnids, so `synsets` must name the devkit's `meta.mat` (its `synsets`
  table: ILSVRC2012_ID -> WNID) or a text map with a wnid and its ILSVRC2012_ID on each line
  (e.g. `n02119789 1 kit_fox`).
- a plain list: `<filename> <wnid or 0-based index into the sorted wnids>` per line (the index
  being the class index of the shards, i.e. the sorted train folders).

Class indices are always those of `classes` ({wnid: index}, the sorted train folders), so train
and val agree whatever file the labels came from.
"""
from __future__ import annotations

import io
import os
import re

from system.config.sections import StorageConfig
from system.data.storage import filesystem

WNID = re.compile(r"^n\d{8}$")
DEVKIT_NAME = "ILSVRC2012_val_{:08d}"


def _read(path: str, storage: StorageConfig | None) -> bytes:
    fs, p = filesystem(path, storage)
    return fs.cat_file(p)


def _class(wnid: str, classes: dict[str, int], where: str) -> int:
    if wnid not in classes:
        raise ValueError(f"{where}: class {wnid!r} is not one of the {len(classes)} train classes")
    return classes[wnid]


def read_synsets(path: str, storage: StorageConfig | None = None) -> dict[int, str]:
    """{ILSVRC2012_ID: wnid} from the devkit's meta.mat or a text map (a wnid and an integer per line)."""
    data = _read(path, storage)
    if path.endswith(".mat"):
        from scipy.io import loadmat

        try:
            table = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
            return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in table}
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not the devkit's meta.mat (expected a synsets table with ILSVRC2012_ID "
                             f"and WNID): {e}") from None
    out: dict[int, str] = {}
    for n, line in enumerate(data.decode().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        wnids = [p for p in parts if WNID.match(p)]
        ids = [p for p in parts if p.isdigit()]
        if not wnids or not ids:
            raise ValueError(f"{path} line {n}: expected a wnid and its ILSVRC2012_ID (e.g. 'n02119789 1 kit_fox'), "
                             f"got {line!r}")
        out[int(ids[0])] = wnids[0]
    return out


def read_val_labels(path: str, classes: dict[str, int], storage: StorageConfig | None = None,
                    synsets: str | None = None) -> dict[str, int]:
    """{image stem: class index} of a validation label file (any format of the module docstring)."""
    text = _read(path, storage).decode()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        return _kaggle(path, lines[1:], classes)
    if all(line.isdigit() for line in lines[:100]):
        if not synsets:
            raise ValueError(f"{path} holds ILSVRC2012_IDs (the devkit's ground truth): also set val_synsets= to the "
                             "devkit's data/meta.mat (or a '<wnid> <ILSVRC2012_ID>' map file)")
        return _devkit(path, lines, read_synsets(synsets, storage), classes, synsets)
    return _plain(path, lines, classes)


def _kaggle(path: str, rows: list[str], classes: dict[str, int]) -> dict[str, int]:
    out = {}
    for n, row in enumerate(rows, 2):
        image, _, boxes = row.partition(",")
        wnid = boxes.split()[0] if boxes.split() else ""
        if not WNID.match(wnid):
            raise ValueError(f"{path} line {n}: expected 'ImageId,<wnid> x y x y ...', got {row!r}")
        out[os.path.splitext(image.strip())[0]] = _class(wnid, classes, f"{path} line {n}")
    return out


def _devkit(path: str, lines: list[str], synsets: dict[int, str], classes: dict[str, int], synsets_path: str) -> dict[str, int]:
    out = {}
    for i, line in enumerate(lines, 1):
        if not line.isdigit() or int(line) not in synsets:
            raise ValueError(f"{path} line {i}: ILSVRC2012_ID {line!r} is not in {synsets_path}")
        out[DEVKIT_NAME.format(i)] = _class(synsets[int(line)], classes, f"{path} line {i}")
    return out


def _plain(path: str, lines: list[str], classes: dict[str, int]) -> dict[str, int]:
    out = {}
    for n, line in enumerate(lines, 1):
        parts = line.replace(",", " ").split()
        if len(parts) < 2:
            raise ValueError(f"{path} line {n}: expected '<filename> <wnid-or-index>', got {line!r}")
        name, lab = os.path.splitext(os.path.basename(parts[0]))[0], parts[1]
        if lab in classes:
            out[name] = classes[lab]
        elif lab.isdigit() and int(lab) < len(classes):
            out[name] = int(lab)
        else:
            raise ValueError(f"{path} line {n}: unknown class {lab!r} (expected a wnid or 0..{len(classes) - 1})")
    return out
