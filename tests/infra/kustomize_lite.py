"""A small, strict subset of kustomize, enough to render infra/k8s/ without the kustomize binary.

Supported kustomization keys: `resources` (files and folders holding a kustomization.yaml),
`patches` (JSON6902 operations, inline `patch:` or `path:`, with a `target` of kind/name),
`images` (name -> newName / newTag / digest, applied to every `containers` / `initContainers`
list, as kustomize >= 4 does for custom resources too). Any other key is an error, so a
kustomization that relies on more than this is refused instead of being rendered differently from
`kubectl kustomize`. tests/infra/test_k8s_manifests.py compares both where kubectl is installed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images"}


class KustomizeError(ValueError):
    pass


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def render(folder: str | Path) -> list[dict]:
    """The documents `kubectl kustomize folder` prints (same content; order of resources kept)."""
    folder = Path(folder)
    kfile = folder / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{folder}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kfile}: keys {sorted(unknown)} are not supported by this renderer")
    docs: list[dict] = []
    for res in k.get("resources", []):
        p = (folder / res).resolve()
        docs.extend(render(p) if p.is_dir() else load_docs(p))
    for patch in k.get("patches", []):
        _apply_patch(folder, patch, docs)
    for image in k.get("images", []):
        for d in docs:
            _set_images(d, image)
    return docs


def _apply_patch(folder: Path, patch: dict, docs: list[dict]) -> None:
    text = patch.get("patch")
    if text is None:
        text = (folder / patch["path"]).read_text()
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise KustomizeError(f"{folder}: only JSON6902 patches (a list of operations) are supported")
    target = patch.get("target") or {}
    if not target.get("kind") or not target.get("name"):
        raise KustomizeError(f"{folder}: a patch needs target.kind and target.name")
    hits = [i for i, d in enumerate(docs)
            if d.get("kind") == target["kind"] and d.get("metadata", {}).get("name") == target["name"]]
    if len(hits) != 1:
        raise KustomizeError(f"{folder}: patch target {target} matches {len(hits)} documents, expected 1")
    i = hits[0]
    try:
        docs[i] = jsonpatch.apply_patch(copy.deepcopy(docs[i]), ops)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
        raise KustomizeError(f"{folder}: patch {ops} does not apply to {target}: {e}") from e


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """'reg/name:tag@sha256:..' -> (name, tag, digest)."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    if ":" in image.rsplit("/", 1)[-1]:
        image, tag = image.rsplit(":", 1)
    return image, tag, digest


def _set_images(node: Any, rule: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and "image" in c:
                        c["image"] = _new_image(c["image"], rule)
            _set_images(value, rule)
    elif isinstance(node, list):
        for v in node:
            _set_images(v, rule)


def _new_image(image: str, rule: dict) -> str:
    name, tag, digest = split_image(image)
    if name != rule["name"]:
        return image
    name = rule.get("newName", name)
    if rule.get("digest"):
        return f"{name}@{rule['digest']}"
    if rule.get("newTag"):
        return f"{name}:{rule['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
