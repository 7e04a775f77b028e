"""A 2-node Ray cluster shaped like KubeRay (a head with no CPUs, so rank 0 runs on the worker node)
with the run on a local S3 endpoint (a moto server of this module, which a test stops and restarts):

- Ray Train's own storage is the run's storage: the worker on the second node commits, and nothing
  the run needs is written to a path local to the head (the driver's node);
- a local `checkpoint.storage_path` is refused on a multi-node cluster unless `checkpoint.shared`;
- wandb's offline run reaches `<run>/wandb/`;
- a storage outage far longer than botocore's own retries survives, and the run loses nothing.

Where this process may create mount namespaces (root, `unshare`), the worker node runs in its own
one with an empty tmpfs over the head-local folder: like a separate pod, it cannot see the head's
files (on the old code: "Unable to set up cluster storage" at the first commit)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from s3_restartable import RestartableS3

from ar_fixtures import free_port, write_image_shards

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "multinode"
N_SAMPLES = 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        srv = RestartableS3()
        srv.start()
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": srv.url}).mkdir(BUCKET)
        try:
            yield srv
        finally:
            if srv.server is not None:
                srv.stop()


def _can_hide_paths() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                           capture_output=True)
    return probe.returncode == 0


def _start_worker_node(address: str, num_cpus: int, hide: Path, log: Path) -> tuple[subprocess.Popen, bool]:
    """`ray start --block` joining `address`, in its own process group (stopped by its id). With
    `hide`, in a private mount namespace where `hide` is an empty tmpfs (another pod's disk)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", f"--address={address}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--block",
           "--disable-usage-stats", "--object-store-memory=150000000", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0"]
    hidden = _can_hide_paths()
    if hidden:
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
               'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hide), *cmd]
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, hidden


def _stop_process_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the group this module started (start_new_session)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def two_nodes(s3, tmp_path_factory):
    """(head-local folder, worker node id, whether the worker node cannot see the head-local folder)."""
    import ray
    from ray.cluster_utils import Cluster

    head_local = tmp_path_factory.mktemp("head_local")
    saved = {"RAY_RESULTS_DIR": os.environ.get("RAY_RESULTS_DIR")}
    os.environ.update(RAY_RESULTS_DIR=str(head_local / "ray_results"))
    if ray.is_initialized():  # another module's local Ray
        ray.shutdown()
    # like KubeRay: the head (where the driver runs) has no CPUs, so no training worker lands there
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_port": free_port()})
    proc, hidden = _start_worker_node(cluster.address, 2, head_local, tmp_path_factory.mktemp("worker_node") / "ray_start.log")
    try:
        env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'cluster'}", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
               **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=True)
        head_id = ray.get_runtime_context().get_node_id()
        deadline = time.time() + 120
        while True:
            others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head_id]
            if others:
                break
            assert proc.poll() is None, f"the worker node did not start (rc={proc.returncode})"
            assert time.time() < deadline, "the worker node did not join in 120 s"
            time.sleep(0.5)
        yield head_local, others[0], hidden
    finally:
        ray.shutdown()
        _stop_process_group(proc)
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _s3fs(s3):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.url}, skip_instance_cache=True)
    return fs


@pytest.fixture(scope="module")
def shards(s3) -> str:
    """A 2-shard image set on the S3 endpoint."""
    from system.config import StorageConfig

    return write_image_shards(f"s3://{BUCKET}/shards", N_SAMPLES, storage=StorageConfig(endpoint_url=s3.url))


def make_cfg(s3, name: str, storage: str, shards: str, *overrides: str):
    from system.config.load import load_config
    from toy_method import ToyExperiment

    return load_config(ToyExperiment, [
        f"run_name={name}", f"data.url={shards}", "data.resolution=16", "data.batch_size=2", "data.num_workers=0",
        f"data.storage.endpoint_url={s3.url}", "data.storage.key=testing", "data.storage.secret=testing",
        "cluster.num_workers=1", "cluster.device=cpu", "cluster.max_failures=0", f"checkpoint.storage_path={storage}",
        "checkpoint.every_steps=1", "checkpoint.keep_last=1", "train.max_steps=2", "method.ema_decay=0.9",
        "train.sample_grid=0", "optim.lr=0.01", "optim.warmup_steps=1", "logging.wandb_mode=disabled",
        "logging.log_every=1", "logging.progress=false", *overrides,
    ])


def _train_worker_nodes() -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_rank0_on_a_worker_node_commits_to_the_runs_storage(two_nodes, s3, shards):
    """Rank 0 on the second node commits (Ray Train's pointer checkpoint included) to S3; the head's
    disk holds nothing of the run; wandb's offline run is uploaded to `<run>/wandb/`."""
    from cluster.training import run_training

    head_local, worker_node, _ = two_nodes
    cfg = make_cfg(s3, "on-worker", f"s3://{BUCKET}/exp", shards, "logging.wandb_mode=offline")
    res = run_training(cfg)
    run = f"{BUCKET}/exp/on-worker"
    fs = _s3fs(s3)
    assert res.step == 2 and res.checkpoint_url == f"s3://{run}/checkpoints/step_00000002"
    assert fs.exists(f"{run}/checkpoints/step_00000002/COMMITTED")
    assert _train_worker_nodes() == {worker_node}  # rank 0 ran on the worker node
    ray_ckpt = res.ray_result.checkpoint  # Ray Train's own record of the commit: in the run's storage
    assert ray_ckpt is not None and ray_ckpt.path.startswith(f"{run}/ray_train/")
    assert json.loads(fs.cat(f"{ray_ckpt.path}/checkpoint_pointer.json"))["url"] == res.checkpoint_url
    assert _files(head_local) == []  # nothing the run needs on a path local to the head
    assert not (Path.home() / "ray_results" / "on-worker").exists()
    runs = fs.glob(f"{run}/wandb/offline-run-*/run-*.wandb")
    assert len(runs) == 1 and fs.size(runs[0]) > 0, fs.find(f"{run}/wandb")


def test_local_storage_on_multinode_needs_shared(two_nodes, s3, shards, tmp_path):
    """A local `checkpoint.storage_path` on a multi-node cluster stops at start-up naming the keys,
    unless declared shared (an NFS / PVC mount on every node)."""
    from cluster.training import prepare_run
    from system.config import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint\.storage_path.*checkpoint\.shared"):
        prepare_run(make_cfg(s3, "local-multi", str(tmp_path / "runs"), shards))
    exp, store, _ = prepare_run(make_cfg(s3, "local-multi", str(tmp_path / "runs"), shards, "checkpoint.shared=true"))
    assert store.exists("config.yaml")


def test_storage_outage_longer_than_botocore_retries(two_nodes, s3, shards):
    """Data and checkpoints on S3, botocore left one attempt (the old code fails at the first
    request of the outage), the endpoint down for OUTAGE_S during training: with
    `storage.retry_budget_s` the run waits it out, with no restart and nothing lost."""
    from cluster.training import run_training

    outage_s, fs = 8.0, _s3fs(s3)
    run = f"{BUCKET}/exp/outage"
    seen: dict = {}

    def outage():
        deadline = time.time() + 300
        while time.time() < deadline:  # the first commit: the run is training
            fs.invalidate_cache()
            if fs.exists(f"{run}/checkpoints/step_00000001/COMMITTED"):
                break
            time.sleep(0.05)
        seen["down_at"] = time.time()
        s3.stop()
        time.sleep(outage_s)
        s3.start()
        seen["up_at"] = time.time()

    t = threading.Thread(target=outage, daemon=True)
    cfg = make_cfg(s3, "outage", f"s3://{BUCKET}/exp", shards, "train.max_steps=8", "checkpoint.keep_last=8",
                   "data.storage.max_attempts=1", "data.storage.retry_budget_s=120")
    t.start()
    res = run_training(cfg)
    t.join(60)
    assert "up_at" in seen
    fs.invalidate_cache()
    assert res.step == 8
    done = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoints"))
    assert done == [f"step_{s:08d}" for s in range(1, 9)]
    assert all(fs.exists(f"{run}/checkpoints/{d}/COMMITTED") for d in done)
    rows = [json.loads(x) for x in fs.cat(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    sessions = fs.cat(f"{run}/sessions.jsonl").decode().splitlines()
    assert len(sessions) == 1  # never restarted
    last_commit = fs.info(f"{run}/checkpoints/step_00000008/COMMITTED")["LastModified"].timestamp()
    assert last_commit > seen["up_at"] - 1  # the run was still going when the endpoint came back
