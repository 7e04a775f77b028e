#!/usr/bin/env python
"""Copy model weights from object storage into a folder (the weights PVC of infra/k8s/weights).

  python infra/load_weights.py s3://bucket/models /models [--endpoint-url URL]

Copies every object under the source prefix, keeping relative paths; a file already there with
the same size is skipped, so a re-run resumes. Credentials come from the environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); the endpoint from --endpoint-url or S3_ENDPOINT_URL.
Exits 1 with one message when the source holds nothing or cannot be read.
"""
from __future__ import annotations

import argparse
import os
import sys

import fsspec


def copy_tree(src: str, dst: str, storage_options: dict | None = None) -> tuple[int, int]:
    """(files copied, files skipped) from the fsspec URL `src` into the local folder `dst`."""
    fs, root = fsspec.core.url_to_fs(src, **(storage_options or {}))
    root = root.rstrip("/")
    files = [p for p, info in fs.find(root, detail=True).items() if info.get("type") == "file"]
    if not files:
        raise FileNotFoundError(f"no objects under {src}")
    copied = skipped = 0
    for path in sorted(files):
        rel = path[len(root):].lstrip("/")
        target = os.path.join(dst, rel)
        size = fs.size(path)
        if os.path.isfile(target) and os.path.getsize(target) == size:
            skipped += 1
            continue
        os.makedirs(os.path.dirname(target) or dst, exist_ok=True)
        tmp = f"{target}.part"
        fs.get(path, tmp)
        os.replace(tmp, target)  # a file is complete or absent, never half-written
        copied += 1
        print(f"[load_weights] {rel} ({size / 2**20:.1f} MiB)", flush=True)
    return copied, skipped


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="fsspec URL of the weights prefix, e.g. s3://bucket/models")
    ap.add_argument("dst", help="local folder, e.g. /models")
    ap.add_argument("--endpoint-url", default=os.environ.get("S3_ENDPOINT_URL") or None)
    args = ap.parse_args(argv)
    opts = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url and args.src.startswith("s3") else {}
    try:
        copied, skipped = copy_tree(args.src, args.dst, opts)
    except Exception as e:  # noqa: BLE001 - one clear line for the Job's log
        print(f"[load_weights] cannot copy {args.src} to {args.dst}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"[load_weights] done: {copied} copied, {skipped} already there, in {args.dst}:", flush=True)
    for dirpath, _, names in sorted(os.walk(args.dst)):
        for n in sorted(names):
            print(f"  {os.path.relpath(os.path.join(dirpath, n), args.dst)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
