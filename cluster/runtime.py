"""Joining or starting Ray, and what the pool runs on (GPU or CPU)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import ray

from system.config import ClusterConfig, ConfigError

REPO_ROOT = str(Path(__file__).resolve().parents[1])


def init_ray(cluster: ClusterConfig, runtime_env: Optional[dict] = None, verbose: bool = True) -> None:
    """Connect to `cluster.address` (or RAY_ADDRESS, as set by `ray job submit`); with neither,
    start a local Ray with `cluster.local_num_cpus` CPUs. No-op when Ray is already up. Without
    `verbose`, worker output stays in the workers' log files (not forwarded to this console)."""
    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose, configure_logging=verbose)
        return
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars", {}))
    # local workers import our packages from this checkout
    env_vars.setdefault("PYTHONPATH", os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    env["env_vars"] = env_vars
    # the dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls
    # address="local": a new Ray of this job's own, never a `ray start` cluster that happens to run on this machine
    ray.init(address="local", num_cpus=cluster.local_num_cpus, runtime_env=env, log_to_driver=verbose,
             configure_logging=verbose)


def resolve_use_gpu(cluster: ClusterConfig) -> bool:
    """`cluster.device`: gpu / cpu, or auto = GPUs when the Ray cluster has them."""
    if cluster.device == "gpu":
        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) < cluster.gpus_per_worker:
            raise RuntimeError(
                "cluster.device=gpu but the Ray cluster has no GPUs "
                f"(resources: {ray.cluster_resources()}); use cluster.device=cpu or auto"
            )
        return True
    if cluster.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


def rank_cpus(cluster: ClusterConfig, data_workers: int = 0) -> float:
    """CPUs Ray reserves for one training rank: what it uses, its process plus its `data_workers`
    DataLoader processes (`data.num_workers`), or `cluster.cpus_per_worker` when that is more."""
    return max(float(cluster.cpus_per_worker), float(data_workers + 1))


def rank_cores(local_rank: int, local_world: int, cpus: float, allowed: Sequence[int]) -> Optional[list[int]]:
    """The cores a CPU rank is bound to: its own `cpus` (`rank_cpus`) of the cores the node lets this
    process use (`allowed`), when the node's `local_world` ranks claim all of them, as DeepSpeed's
    launcher does with --bind_cores_to_rank; None otherwise (the OS places the ranks among the node's
    other work). A bound rank keeps its collectives' threads on its core and is not moved between
    cores: on a node the ranks fill, that is about a tenth of a small model's step (bench/train_overhead.py)."""
    n, cores = int(cpus), sorted(allowed)
    if n != cpus or n < 1 or local_world * n != len(cores) or not 0 <= local_rank < local_world:
        return None
    return cores[local_rank * n:(local_rank + 1) * n]


def bind_to_cores(local_rank: int, local_world: int, cpus: float) -> Optional[list[int]]:
    """Bind every thread of this process (and what it starts later) to `rank_cores`; returns the cores
    (None: left to the OS, also where the platform cannot bind)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = rank_cores(local_rank, local_world, cpus, os.sched_getaffinity(0))
    if cores is not None:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:  # a thread that ended meanwhile
                pass
    return cores


def _per_rank(cluster: ClusterConfig, data_workers: int) -> str:
    cpus = rank_cpus(cluster, data_workers)
    if cpus > cluster.cpus_per_worker:
        return f"{cpus:g} CPUs per rank (data.num_workers={data_workers} DataLoader processes + 1)"
    return f"cluster.cpus_per_worker={cluster.cpus_per_worker:g}"


def check_resources(cluster: ClusterConfig, use_gpu: bool, extra_cpus: float = 0.0, extra_gpus: float = 0.0,
                    data_workers: int = 0) -> None:
    """Fail early (before any actor starts) when the pool (`rank_cpus` per rank), plus `extra_*` for
    other actors of the job (e.g. the actors of an actor-fed source), cannot fit into the cluster."""
    res = ray.cluster_resources()
    need_cpu = cluster.num_workers * rank_cpus(cluster, data_workers) + extra_cpus
    others = f" + {extra_cpus:g} for the job's other actors" if extra_cpus else ""
    if res.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"the job needs {need_cpu:g} CPUs (cluster.num_workers={cluster.num_workers} x "
            f"{_per_rank(cluster, data_workers)}{others}) but the Ray cluster has {res.get('CPU', 0):g}; "
            "lower cluster.num_workers, cluster.cpus_per_worker or data.num_workers (or raise cluster.local_num_cpus)"
        )
    need_gpu = (cluster.num_workers * cluster.gpus_per_worker if use_gpu else 0) + extra_gpus
    if need_gpu and res.get("GPU", 0) < need_gpu:
        raise ConfigError(
            f"the job needs {need_gpu:g} GPUs (cluster.num_workers x cluster.gpus_per_worker"
            f"{' + the other actors' if extra_gpus else ''}) but the Ray cluster has "
            f"{res.get('GPU', 0):g}; lower cluster.num_workers or cluster.gpus_per_worker"
        )


def check_local_resources(cluster: ClusterConfig, extra_cpus: float = 0.0, data_workers: int = 0) -> None:
    """Before starting a local Ray: the pool (`rank_cpus` per rank, plus other actors) must fit in
    the CPUs it will have."""
    have = cluster.local_num_cpus or os.cpu_count() or 1
    per_rank = rank_cpus(cluster, data_workers)
    need = cluster.num_workers * per_rank + extra_cpus
    if need > have:
        key = "cluster.local_num_cpus" if cluster.local_num_cpus else "this machine's CPU count"
        raise ConfigError(
            f"config key 'cluster.num_workers' = {cluster.num_workers}: the pool needs {need:g} CPUs "
            f"(cluster.num_workers x {_per_rank(cluster, data_workers)}"
            f"{f' + {extra_cpus:g} for other actors' if extra_cpus else ''}) but the local Ray gets {have} ({key}); "
            f"use cluster.num_workers <= {int(max(have - extra_cpus, 0) // per_rank)}"
            f"{' or fewer data.num_workers' if per_rank > cluster.cpus_per_worker else ''}, or join a cluster (cluster.address)")


def worker_nodes() -> tuple[str, set[str]]:
    """(this process's node id, ids of the alive nodes that can host a training worker: with CPUs or GPUs)."""
    here = ray.get_runtime_context().get_node_id()
    hosts = {n["NodeID"] for n in ray.nodes()
             if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)}
    return here, hosts


def check_storage_shared(storage_path: str, shared: bool, here: str, hosts: set[str]) -> None:
    """A local `checkpoint.storage_path` is one folder for the whole run only when every rank runs on
    the driver's node (`here`), or when it is declared the same folder on every node (`shared`)."""
    from system.data.storage import protocol

    if protocol(storage_path) != "file" or shared or hosts == {here}:
        return
    where = (f"{len(hosts - {here})} node(s) besides the driver's" if here in hosts
             else "nodes other than the driver's, which has no CPUs or GPUs for them")
    raise ConfigError(
        f"config key 'checkpoint.storage_path' = {storage_path!r} is a local folder, but the Ray cluster's workers run on "
        f"{where}: each "
        "rank would write its checkpoint shards to its own disk, and the driver would not see them. Use object storage "
        "(checkpoint.storage_path=s3://bucket/prefix), or a folder mounted on every node (NFS, a shared PVC) and declare "
        "it with checkpoint.shared=true")


STALE_LOCK_S = 300  # a torch extension build takes well under this on CPU


def check_extension_locks(root: Optional[str] = None) -> None:
    """A build lock of a torch C++ extension (DeepSpeed's CPU communication op) left by an
    interrupted first run makes every later run wait forever after "Started training worker
    group"; name it instead (older than STALE_LOCK_S seconds: no build is still running)."""
    import glob
    import time

    root = root or os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    now = time.time()
    stale = [p for p in glob.glob(os.path.join(root, "*", "*", "lock")) if now - os.path.getmtime(p) > STALE_LOCK_S]
    if stale:
        raise ConfigError(f"stale build lock(s) left by an interrupted run: {', '.join(stale)}; DeepSpeed would wait "
                          f"for them forever. Remove them (rm {' '.join(stale)}) and start again")
