#!/usr/bin/env python
"""Fault soak: N seeded scenarios on the tiny EOSTok preset (shrunk: 32 px, 2 CPU ranks, ZeRO-2,
GAN + LeCam + EMA + validation on, 12 steps, a checkpoint every 3), each with ONE fault, each
compared with an uninterrupted reference run:

  kill_rank     kill -9 of one RayTrainWorker (a random rank, at a random step): Ray Train restarts
                the pool from the newest checkpoint
  kill_driver   kill -9 of the driver (a random step), then the same command resubmitted
  s3_outage     the S3 endpoint (moto) refuses every connection for 30-300 s from a random step
  ckpt_damage   the run stops at a commit step; one file of that newest checkpoint that a resume
                reads is truncated or has a bit flipped; the run is continued: it falls back to the
                previous checkpoint (losing the newest by design) and trains the lost steps again
  data_damage   one sample corrupt and one shard unreadable (garbage, truncated or missing) from
                the start; compared with a reference run on the same damaged data

Checked for each: every committed checkpoint of the reference exists with byte-identical files
(the sizes and SHA-256 its commit marker lists), the exports are byte-identical (a safetensors
header compared parsed: safetensors writes its metadata in a random order), metrics.jsonl holds
every step once with the reference's values (timings aside), and every rank drew the reference's
samples at every step (the keys of the last attempt of each step, logged as the loop draws them):
every sample of each epoch once, an unreadable sample's place taken by a different readable one.
Recovery time: from the fault until the run draws a batch past the step it had reached (for
ckpt_damage: from the resubmission until it is past the lost checkpoint's step).

    python bench/fault_soak.py --scenarios 20 --seed 0          # the full soak (prints the table)
    python bench/fault_soak.py --scenarios 3 --kinds kill_rank,kill_driver,ckpt_damage

Everything runs here: a Ray head started by this process (its workers are this process's
descendants: only those are ever killed), moto's S3 server in this process (the runs' storage),
the embedded photos as local shards, one driver subprocess per run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
HELPERS = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "cluster")]  # the restartable S3 server, the key log
sys.path[:0] = HELPERS

KINDS = ("kill_rank", "kill_driver", "s3_outage", "ckpt_damage", "data_damage")
BUCKET = "soak"
MODEL_FILE = re.compile(r"/mp_rank_\d+_model_states\.pt$")
PRESET = [
    "--config", "configs/experiments/eostok_tiny.yaml", "run_name=soak", "data.embedded=false", "data.resolution=32",
    "data.batch_size=2", "data.num_workers=0", "cluster.num_workers=2", "cluster.max_failures=3",
    "method.model.tokenizer_overrides={num_latent_tokens: 16, enc_width: 32, dec_width: 32, enc_heads: 2, dec_heads: 2, "
    "quantizer: {type: ibq, codebook_size: 64, dim: 16}}",
    "method.gan=0.1", "method.gan_start_step=0", "method.lecam=0.05", "method.ema_decay=0.9",
    "optim.schedule=constant", "optim.warmup_steps=2",  # the LR does not depend on train.max_steps (ckpt_damage stops early)
    "checkpoint.keep_last=20", "checkpoint.resume=true", "train.sample_grid=0",
    "train.val_max_images=8", "logging.wandb_mode=disabled", "logging.progress=false", "logging.log_every=1",
    "data.storage.retry_budget_s=900", "data.storage.retry_max_delay_s=5",
]


# ---------------------------------------------------------------------------- a run
def drive(argv: list[str]) -> None:
    """A driver subprocess: the tiny EOSTok job on the soak's Ray cluster, every rank's drawn keys logged
    to $SOAK_KEYS (tests/cluster/ar_fixtures.py, on the workers' path too)."""
    from ar_fixtures import KeyLoggingImages
    from cluster.cli import run_job
    from cluster.training import resolve_job, train
    from jobs.eostok_h import DEFAULTS
    from system.config import EOSTokExperiment, cli_config

    exp = cli_config(EOSTokExperiment, argv, DEFAULTS)
    job = resolve_job(exp, source=KeyLoggingImages(os.environ["SOAK_KEYS"]))
    run_job(lambda: train(exp, job))


# ---------------------------------------------------------------------------- the soak
@dataclass
class Scenario:
    index: int
    kind: str
    seed: int
    detail: str = ""
    recovery_s: Optional[float] = None
    identical: bool = False
    problems: list[str] = field(default_factory=list)
    note: str = ""
    wall_s: float = 0.0


class Soak:
    def __init__(self, root: Path, steps: int = 12, every: int = 3):
        self.root, self.steps, self.every = root, steps, every
        self.procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        import ray

        from s3_restartable import RestartableS3

        os.environ.update(AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak", AWS_DEFAULT_REGION="us-east-1")
        os.environ.pop("AWS_PROFILE", None)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
        self.s3 = RestartableS3().start()
        self.fs().mkdir(BUCKET)
        from system.data.embedded import ensure_embedded_dataset

        self.train = ensure_embedded_dataset(str(self.root / "data" / "train"), split="train", per_class=4, num_shards=4,
                                             resolution=32)
        self.val = ensure_embedded_dataset(str(self.root / "data" / "val"), split="val", per_class=1, num_shards=1,
                                           resolution=32)
        # the workers (children of this Ray's raylet) inherit this environment: our packages, CPU DeepSpeed
        os.environ.update(PYTHONPATH=os.pathsep.join([*HELPERS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                          DS_ACCELERATOR="cpu", WANDB_MODE="disabled", RAY_DEDUP_LOGS="0",
                          RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
                          RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION="0")
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the drivers join with the address alone
        for attempt in range(3):  # Ray gives its raylet 30 s to register: a loaded machine may need another try
            try:
                ray.init(num_cpus=4, include_dashboard=True, dashboard_port=_free_port(), log_to_driver=False,
                         configure_logging=False)
                break
            except Exception:  # noqa: BLE001
                ray.shutdown()
                if attempt == 2:
                    raise
        self.address = ray.get_runtime_context().gcs_address

    def stop(self) -> None:
        import ray

        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        ray.shutdown()
        self.s3.stop()

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.s3.url}, skip_instance_cache=True)

    # ------------------------------------------------------------------ runs
    def argv(self, name: str, steps: Optional[int] = None, data: Optional[str] = None) -> list[str]:
        return [*PRESET, f"data.url={data or self.train}", f"data.val_url={self.val}", f"train.max_steps={steps or self.steps}",
                f"checkpoint.every_steps={self.every}",
                f"checkpoint.storage_path=s3://{BUCKET}/{name}", f"data.storage.endpoint_url={self.s3.url}",
                f"cluster.address={self.address}"]

    def launch(self, name: str, argv: list[str]) -> subprocess.Popen:
        keys = self.root / "keys" / name
        keys.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "keys" / f"{name}.driver.log", "a")
        env = {**os.environ, "SOAK_KEYS": str(keys)}
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--drive", *argv], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def finish(self, p: subprocess.Popen, name: str, timeout: float = 1800) -> None:
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
        if rc != 0:
            tail = (self.root / "keys" / f"{name}.driver.log").read_text()[-3000:]
            raise RuntimeError(f"run {name} ended with {rc}:\n{tail}")

    def run(self, name: str, steps: Optional[int] = None, data: Optional[str] = None) -> None:
        self.finish(self.launch(name, self.argv(name, steps, data)), name)

    def rows(self, name: str) -> list[dict]:
        out = []
        for f in sorted((self.root / "keys" / name).glob("keys_rank*.jsonl")):
            rank = int(f.stem.removeprefix("keys_rank"))
            for line in f.read_text().splitlines():
                if line.strip():
                    out.append({**json.loads(line), "rank": rank})
        return out

    def wait_for(self, name: str, step: int, p: subprocess.Popen, rank: Optional[int] = None, after: float = 0.0,
                 may_end: bool = False) -> dict:
        """The first logged batch of step >= `step` (of `rank`, drawn after `after`) once it exists.
        `may_end`: a run that ends well first (its last batch drawn before the fault) gives
        {"t": the time it ended}: what the fault held up was its final commit and export."""
        while True:
            hit = [r for r in self.rows(name) if r["step"] >= step and r["t"] > after and rank in (None, r["rank"])]
            if hit:
                return min(hit, key=lambda r: r["t"])
            if p.poll() is not None:
                if may_end and p.returncode == 0:
                    return {"t": time.time()}
                raise RuntimeError(f"run {name} ended (rc {p.returncode}) before step {step}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ faults
    def kill_rank(self, sc: Scenario, name: str, rng: random.Random) -> None:
        rank, step = rng.randrange(2), rng.randrange(2, self.steps - 1)
        sc.detail = f"rank {rank} at step {step}"
        p = self.launch(name, self.argv(name))
        row = self.wait_for(name, step, p, rank)
        _kill_descendant(row["pid"], "RayTrainWorker")
        t = time.time()
        sc.recovery_s = self.wait_for(name, row["step"] + 1, p, after=t)["t"] - t
        self.finish(p, name)

    def kill_driver(self, sc: Scenario, name: str, rng: random.Random) -> None:
        step = rng.randrange(2, self.steps - 1)
        sc.detail = f"driver at step {step}, resubmitted"
        p = self.launch(name, self.argv(name))
        row = self.wait_for(name, step, p)
        pids = {r["pid"] for r in self.rows(name)}
        p.kill()
        t = time.time()
        p.wait()
        _wait_gone(pids, timeout=120)  # Ray ends the dead driver's workers before the job is resubmitted
        p = self.launch(name, self.argv(name))
        sc.recovery_s = self.wait_for(name, row["step"] + 1, p, after=t)["t"] - t
        self.finish(p, name)

    def s3_outage(self, sc: Scenario, name: str, rng: random.Random, short: bool = False) -> None:
        step, seconds = rng.randrange(2, self.steps - 1), 30 if short else rng.randint(30, 300)
        sc.detail = f"{seconds} s from step {step}"
        p = self.launch(name, self.argv(name))
        row = self.wait_for(name, step, p)
        timer = self.s3.outage(seconds)
        t = time.time()
        try:
            sc.recovery_s = self.wait_for(name, row["step"] + 1, p, after=t, may_end=True)["t"] - t
            self.finish(p, name)
        finally:
            timer.join()

    def ckpt_damage(self, sc: Scenario, name: str, rng: random.Random) -> None:
        k = self.every * rng.randrange(2, self.steps // self.every)  # a commit with one before it
        self.run(name, steps=k)
        ckpt = f"{BUCKET}/{name}/soak/checkpoints/step_{k:08d}"
        fs = self.fs()
        # every file a resume reads (at this world size: each rank its own; under ZeRO 1/2 the weight-free
        # module metadata instead of DeepSpeed's module file, which no resume reads and which so loses nothing)
        files = sorted(f for f in json.loads(fs.cat_file(f"{ckpt}/COMMITTED"))["files"] if not MODEL_FILE.search(f))
        rel, how = rng.choice(files), rng.choice(["truncated", "bit-flipped"])
        data = bytearray(fs.cat_file(f"{ckpt}/{rel}"))
        if how == "truncated":
            data = data[: len(data) // 2]
        else:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        fs.pipe_file(f"{ckpt}/{rel}", bytes(data))
        sc.detail = f"step {k}: {rel} {how}"
        t = time.time()
        p = self.launch(name, self.argv(name))
        sc.recovery_s = self.wait_for(name, k + 1, p, after=t)["t"] - t
        self.finish(p, name)
        log = fs.cat_file(f"{BUCKET}/{name}/soak/logs/rank_0.log").decode(errors="replace")
        if f"step_{k:08d}: {rel}" not in log:
            sc.problems.append(f"the damaged file {rel} is not named in rank 0's log")
        sc.note = f"newest checkpoint (step {k}) lost by design: trained again from step {k - self.every}"

    def data_damage(self, sc: Scenario, name: str, rng: random.Random) -> str:
        """Damaged copy of the train shards (one shard unreadable, one sample corrupt in another);
        returns its URL (the scenario's reference runs on it too)."""
        src = Path(self.train)
        dst = self.root / "data" / name / "train"
        shutil.copytree(src, dst)
        shards = json.loads((dst / "index.json").read_text())["shards"]
        bad, other = rng.sample(range(len(shards)), 2)
        how = rng.choice(["garbage", "truncated", "missing"])
        path = dst / shards[bad]["name"]
        if how == "missing":
            path.unlink()
        elif how == "truncated":
            path.write_bytes(path.read_bytes()[:700])  # the first member's header and part of its bytes
        else:
            path.write_bytes(random.Random(sc.seed).randbytes(path.stat().st_size))
        key = _corrupt_one_sample(dst / shards[other]["name"], rng)
        sc.detail = f"shard {bad} {how}, sample {key} corrupt"
        sc.note = "compared with a reference on the same damaged data"
        return str(dst)

    # ------------------------------------------------------------------ checks
    def compare(self, sc: Scenario, name: str, ref: str) -> None:
        fs = self.fs()
        a, b = f"{BUCKET}/{ref}/soak", f"{BUCKET}/{name}/soak"
        for step in range(self.every, self.steps + 1, self.every):
            want = json.loads(fs.cat_file(f"{a}/checkpoints/step_{step:08d}/COMMITTED"))["files"]
            try:
                got = json.loads(fs.cat_file(f"{b}/checkpoints/step_{step:08d}/COMMITTED"))["files"]
            except FileNotFoundError:
                sc.problems.append(f"checkpoint {step} missing")
                continue
            differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            if differ:
                sc.problems.append(f"checkpoint {step}: {len(differ)} file(s) differ: {', '.join(differ)}")
                for rel in differ:  # both versions kept for a look (under --out)
                    for run, where in ((ref, a), (name, b)):
                        target = self.root / "differ" / name / f"step_{step:08d}" / run / rel
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(_cat(fs, f"{where}/checkpoints/step_{step:08d}/{rel}"))
        for path in sorted(fs.ls(f"{a}/export")):
            rel = path.rsplit("/", 1)[-1]
            if rel.endswith(".yaml"):  # the resolved config names the run's storage
                continue
            want_bytes, got_bytes = fs.cat_file(path), _cat(fs, f"{b}/export/{rel}")
            if _canonical(rel, want_bytes) != _canonical(rel, got_bytes):
                sc.problems.append(f"export/{rel} differs")
                for run, data in ((ref, want_bytes), (name, got_bytes)):
                    target = self.root / "differ" / name / "export" / run / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
        want_rows, got_rows = (_metrics(fs.cat_file(f"{x}/metrics.jsonl")) for x in (a, b))
        steps = [r["step"] for r in got_rows if "loss" in r]
        if steps != list(range(1, self.steps + 1)):
            sc.problems.append(f"metrics steps {steps} (want every step once)")
        elif want_rows != got_rows:
            sc.problems.append("metrics values differ from the reference")
        want_keys, got_keys = _last_draws(self.rows(ref)), _last_draws(self.rows(name))
        if want_keys != got_keys:
            wrong = sorted(k for k in set(want_keys) | set(got_keys) if want_keys.get(k) != got_keys.get(k))
            sc.problems.append(f"drawn samples differ at (rank, step) {wrong[:3]}")
        sc.identical = not sc.problems


def _epoch_check(rows: list[dict], steps: int, per_step: int = 4, epoch_samples: int = 32, most: int = 1) -> list[str]:
    """The draws of each epoch (the final attempt of each step; the last epoch may be partial): as
    many as its steps hold, no sample more than `most` times (1: every sample of a whole epoch
    once; 2 with unreadable data: its own place and one substitution)."""
    from collections import Counter

    draws, spe, out = _last_draws(rows), epoch_samples // per_step, []
    for e in range(-(-steps // spe)):
        lo, hi = e * spe, min((e + 1) * spe, steps)
        counts = Counter(k for (_, step), ks in draws.items() if lo <= step < hi for k in ks)
        if sum(counts.values()) != (hi - lo) * per_step or max(counts.values(), default=0) > most:
            out.append(f"epoch {e}: {sum(counts.values())} draws of {len(counts)} samples (want {(hi - lo) * per_step}), "
                       f"one drawn {max(counts.values(), default=0)} times (at most {most})")
    return out


def _last_draws(rows: list[dict]) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> keys of the last attempt that drew that step."""
    out = {}
    for r in sorted(rows, key=lambda r: r["t"]):
        out[(r["rank"], r["step"])] = r["keys"]
    return out


def _metrics(data: bytes) -> list[dict]:
    timing = ("_per_s", "_s", "per_s")
    rows = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if not k.endswith(timing) and k not in ("time", "images_per_s")} for r in rows]


def _cat(fs, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return b""


def _canonical(name: str, data: bytes) -> tuple:
    """A file's bytes for comparison; a safetensors file as (its header parsed, its tensor bytes):
    safetensors writes the header's metadata map in a per-process random order (a Rust HashMap),
    so two exports of the same tensors and metadata differ in those bytes alone."""
    if not name.endswith(".safetensors") or len(data) < 8:
        return (hashlib.sha256(data).hexdigest(),)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return json.dumps(header, sort_keys=True), hashlib.sha256(data[8 + n:]).hexdigest()


def _corrupt_one_sample(tar_path: Path, rng: random.Random) -> str:
    """Garble the image bytes of one sample of a tar in place (same size: the tar stays readable)."""
    import tarfile

    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and not m.name.endswith(".cls")]
    m = rng.choice(members)
    with open(tar_path, "r+b") as f:
        f.seek(m.offset_data)
        f.write(rng.randbytes(m.size))
    return m.name.rsplit(".", 1)[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_descendant(pid: int, name: str) -> None:
    """SIGKILL `pid`, only if it is a process this one started (a descendant) named like `name`."""
    import psutil

    mine = {c.pid for c in psutil.Process().children(recursive=True)}
    proc = psutil.Process(pid)
    if pid not in mine or name not in " ".join(proc.cmdline()) + proc.name():
        raise RuntimeError(f"pid {pid} ({proc.name()}) is not a {name} this soak started: not killed")
    os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: set[int], timeout: float) -> None:
    import psutil

    deadline = time.time() + timeout
    while any(psutil.pid_exists(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)


# ---------------------------------------------------------------------------- main
def plan(n: int, seed: int, kinds: tuple[str, ...]) -> list[Scenario]:
    """`n` scenarios cycling through `kinds` in a seeded order, each with its own seed."""
    rng = random.Random(seed)
    order = [kinds[i % len(kinds)] for i in range(n)]
    rng.shuffle(order)
    return [Scenario(i, kind, rng.randrange(2**31)) for i, kind in enumerate(order)]


def soak(n: int, seed: int, kinds: tuple[str, ...], root: Path, short: bool = False, steps: int = 12, every: int = 3,
         log=print, only: Optional[set[int]] = None) -> list[Scenario]:
    s = Soak(root, steps, every)
    s.start()
    try:
        t = time.time()
        s.run("reference")
        problems = _epoch_check(s.rows("reference"), s.steps)
        if problems:
            raise RuntimeError(f"the reference run does not draw every sample of each epoch once: {problems}")
        log(f"reference run: {time.time() - t:.0f} s")
        out = []
        for sc in (sc for sc in plan(n, seed, kinds) if only is None or sc.index in only):
            t, name, rng = time.time(), f"s{sc.index:02d}-{sc.kind}", random.Random(sc.seed)
            try:
                if sc.kind == "data_damage":
                    url = s.data_damage(sc, name, rng)
                    s.run(f"{name}-ref", data=url)
                    s.run(name, data=url)
                    sc.problems += _epoch_check(s.rows(name), s.steps, most=2)
                    s.compare(sc, name, f"{name}-ref")
                    sc.recovery_s = 0.0
                else:
                    getattr(s, sc.kind)(sc, name, rng, **({"short": short} if sc.kind == "s3_outage" else {}))
                    s.compare(sc, name, "reference")
            except Exception as e:  # noqa: BLE001 - a failed scenario is reported, the soak goes on
                sc.problems.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            sc.wall_s = time.time() - t
            out.append(sc)
            log(row(sc))
        return out
    finally:
        s.stop()


def row(sc: Scenario) -> str:
    rec = "-" if sc.recovery_s is None else f"{sc.recovery_s:.1f}"
    verdict = "bit-identical" if sc.identical else "DIFFERS: " + "; ".join(sc.problems)
    return (f"{sc.index:>3}  {sc.kind:<12} {sc.detail:<46} {rec:>8}  {sc.wall_s:6.0f}  {verdict}"
            + (f"  ({sc.note})" if sc.note else ""))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--drive"]:
        drive(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--short-outage", action="store_true", help="S3 outages of 30 s (the test suite's version)")
    ap.add_argument("--steps", type=int, default=12, help="train.max_steps of every run (an epoch is 8 steps)")
    ap.add_argument("--every", type=int, default=3, help="checkpoint.every_steps (ckpt_damage needs steps >= 3 x every)")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder, removed)")
    ap.add_argument("--only", default=None, help="comma-separated scenario numbers of the seeded plan to run (a rerun)")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        ap.error(f"unknown kinds {unknown}; choose from {KINDS}")
    root = Path(args.out or tempfile.mkdtemp(prefix="fault-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    t = time.time()
    print(f"{'#':>3}  {'fault':<12} {'detail':<46} {'recov s':>8}  {'wall s':>6}  result", flush=True)
    try:
        results = soak(args.scenarios, args.seed, kinds, root, short=args.short_outage, steps=args.steps,
                       every=args.every, log=lambda line: print(line, flush=True),
                       only=None if args.only is None else {int(i) for i in args.only.split(",")})
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    k = sum(sc.identical for sc in results)
    print(f"{len(results)} scenarios, {k} bit-identical (wall {time.time() - t:.0f} s)")
    print(json.dumps({"scenarios": len(results), "bit_identical": k, "wall_s": round(time.time() - t, 1),
                      "results": [{"kind": sc.kind, "detail": sc.detail, "recovery_s": sc.recovery_s,
                                   "identical": sc.identical, "problems": sc.problems, "note": sc.note}
                                  for sc in results]}))
    return 0 if k == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
