"""Images/s per rank (one process, num_workers=0: one core) for decode + center-crop + flip +
batch, from these sources side by side in one run:

  plain             a PIL loop over the JPEG files on local disk (the baseline)
  local             ShardReader over WebDataset shards in a local folder (prefetch on)
  s3, no prefetch   ShardReader over the same shards on a local S3 endpoint (moto server, own process)
  s3, prefetch      the same with the next chunk fetched in a background thread (the default)
  s3 + latency      both again with `--latency-ms` added to every chunk read (moto on 127.0.0.1
                    answers in about a millisecond; S3 takes tens): what the prefetch hides

The shards are read in chunks (ranged reads by the per-sample offsets in the shard markers). The
JPEGs are ImageNet-like crops of scikit-image's bundled photos (short side 300-450 px by default).
The last line is the goal: S3 with prefetch >= 0.9x the plain local loop.

    python bench/data_throughput.py [--images 512] [--resolution 256] [--batch 32] [--repeats 5]
                                    [--shard-size 256] [--chunk-size 64] [--latency-ms 30]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from system.config import StorageConfig  # noqa: E402
import system.data.tario as tario  # noqa: E402
from system.data import ShardReader, filesystem, plan_shards, write_index, write_shard  # noqa: E402
from system.data.embedded import load_photos, random_crops  # noqa: E402
from system.data.transforms import center_crop_arr, flip_decision, to_tensor  # noqa: E402


def make_jpegs(folder: Path, n: int, short_side: int) -> list[tuple[str, str, int]]:
    photos = load_photos()
    items = []
    for c, (name, photo) in enumerate(photos.items()):
        per = n // len(photos) + (c < n % len(photos))
        rng = np.random.default_rng([1, c])
        for j, data in enumerate(random_crops(photo, per, int(short_side / 1.25), rng)):
            path = folder / f"{name}_{j:04d}.jpg"
            path.write_bytes(data)
            items.append((str(path), path.stem, c))
    return items


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def bench_plain(items, resolution: int, batch: int) -> tuple[int, float, float]:
    t0, c0, done = time.perf_counter(), time.process_time(), 0
    imgs = []
    for path, key, _ in items:
        img = Image.open(path).convert("RGB")
        arr = center_crop_arr(img, resolution)
        if flip_decision(0, 0, key):
            arr = arr[:, ::-1]
        imgs.append(arr)
        if len(imgs) == batch:
            _ = to_tensor(imgs), torch.tensor([0] * batch)
            done += batch
            imgs = []
    return done, time.perf_counter() - t0, time.process_time() - c0


def bench_reader(url: str, storage: StorageConfig, n: int, resolution: int, batch: int, chunk_size: int,
                 prefetch: bool, latency_s: float = 0.0) -> tuple[int, float, float]:
    reader = ShardReader(url, batch_size=batch, resolution=resolution, num_workers=0, storage=storage,
                         chunk_size=chunk_size, prefetch=prefetch)
    real = tario.read_samples
    if latency_s:
        def slow(*args):  # the wait of a remote request (sleep releases the GIL, as a socket wait does)
            time.sleep(latency_s)
            return real(*args)

        tario.read_samples = slow
    try:
        t0, c0, done = time.perf_counter(), time.process_time(), 0
        for b in reader:
            done += len(b["key"])
            if done + batch > n:
                break
        return done, time.perf_counter() - t0, time.process_time() - c0
    finally:
        tario.read_samples = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--short-side", type=int, default=360, help="typical short side of the JPEGs (ImageNet ~ 360)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=64, help="samples per ranged read (reader chunk_size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, default=30.0, help="added to each chunk read in the '+ latency' rows")
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    proc, endpoint = start_s3()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / "jpegs"
            files.mkdir()
            items = make_jpegs(files, args.images, args.short_side)
            mb = sum(os.path.getsize(p) for p, _, _ in items) / 2**20
            plans = plan_shards(items, "train", args.shard_size)
            s3 = StorageConfig(endpoint_url=endpoint)
            fs, _ = filesystem("s3://bench", s3)
            fs.mkdir("bench")
            for out, st in ((str(Path(tmp) / "shards"), StorageConfig()), ("s3://bench/shards", s3)):
                for p in plans:
                    write_shard(p, out, st)
                write_index(plans, out, {str(i): i for i in range(8)}, st)
            print(f"{len(items)} JPEGs ({mb:.1f} MiB, short side ~{args.short_side}px) -> {len(plans)} shards; "
                  f"resolution {args.resolution}, batch {args.batch}, best of {args.repeats}")
            local_url, s3_url = str(Path(tmp) / "shards/train"), "s3://bench/shards/train"
            n, res, bs, cs = len(items), args.resolution, args.batch, args.chunk_size
            plain, best = "plain PIL loop (local files)", "shards, S3 (moto), prefetch"
            runs = {
                plain: lambda: bench_plain(items, res, bs),
                "shards, local disk, prefetch": lambda: bench_reader(local_url, StorageConfig(), n, res, bs, cs, True),
                "shards, S3 (moto), no prefetch": lambda: bench_reader(s3_url, s3, n, res, bs, cs, False),
                best: lambda: bench_reader(s3_url, s3, n, res, bs, cs, True),
            }
            if args.latency_ms > 0:
                lat = args.latency_ms / 1000
                runs[f"S3 +{args.latency_ms:g} ms, no prefetch"] = lambda: bench_reader(s3_url, s3, n, res, bs, cs, False, lat)
                runs[f"S3 +{args.latency_ms:g} ms, prefetch"] = lambda: bench_reader(s3_url, s3, n, res, bs, cs, True, lat)
            for fn in runs.values():
                fn()  # warm-up: imports, connections, page cache
            results: dict[str, tuple[int, float, float]] = {}
            for _ in range(args.repeats):  # interleaved, best of each: robust to other load on the machine
                for name, fn in runs.items():
                    r = fn()
                    if name not in results or r[0] / r[1] > results[name][0] / results[name][1]:
                        results[name] = r
            base_rate = results[plain][0] / results[plain][1]
            print(f"{'source':32s} {'img/s per rank':>15s} {'img/CPU-s':>10s} {'vs plain':>9s}")
            for name, (k, wall, cpu) in results.items():
                print(f"{name:32s} {k / wall:15.1f} {k / cpu:10.1f} {k / wall / base_rate:8.2f}x")
            rate = results[best][0] / results[best][1]
            print(f"S3 with prefetch: {rate:.1f} img/s vs plain local loop: {base_rate:.1f} img/s -> "
                  f"{rate / base_rate:.2f}x (goal >= 0.9x: {'met' if rate / base_rate >= 0.9 else 'NOT met'})")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
