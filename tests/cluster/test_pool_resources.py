"""What a training pool reserves and where its run may live, decided without starting Ray: CPUs per
rank (its DataLoader processes included), the cores a CPU rank is bound to, a local storage path on
a multi-node cluster, Ray Train's own storage."""
from __future__ import annotations

import pytest

from system.config import ConfigError


def cfg(*over: str):
    from system.config.load import load_config
    from toy_method import ToyExperiment

    return load_config(ToyExperiment, ["run_name=r", "data.url=/data", *over])


@pytest.mark.parametrize("cpus,loaders,want", [(1, 0, 1), (1, 2, 3), (4, 2, 4), (2.5, 2, 3), (1, 7, 8)])
def test_each_rank_reserves_its_dataloader_processes(cpus, loaders, want):
    from cluster.train_pool import worker_resources

    exp = cfg(f"cluster.cpus_per_worker={cpus}", f"data.num_workers={loaders}", "cluster.gpus_per_worker=1")
    assert worker_resources(exp, use_gpu=False) == {"CPU": want}
    assert worker_resources(exp, use_gpu=True) == {"CPU": want, "GPU": 1}


def test_local_resources_count_the_dataloader_processes():
    from cluster.runtime import check_local_resources

    c = cfg("cluster.num_workers=2", "cluster.local_num_cpus=4").cluster
    check_local_resources(c, data_workers=1)  # 2 x 2 CPUs
    with pytest.raises(ConfigError, match=r"6 CPUs .*data\.num_workers=2.*local_num_cpus"):
        check_local_resources(c, data_workers=2)  # 2 x 3 CPUs > 4


def test_cpu_ranks_get_their_own_cores_only_when_they_fill_the_node():
    from cluster.runtime import rank_cores

    assert [rank_cores(r, 2, 1, {0, 1}) for r in range(2)] == [[0], [1]]  # 2 ranks on a 2-core machine
    assert [rank_cores(r, 2, 3, [4, 5, 6, 7, 8, 9]) for r in range(2)] == [[4, 5, 6], [7, 8, 9]]  # + 2 DataLoaders each
    assert rank_cores(0, 2, 1, range(16)) is None  # cores to spare: the OS places the ranks
    assert rank_cores(0, 1, 1.5, {0, 1}) is None and rank_cores(0, 3, 1, {0, 1}) is None


def test_bound_process_keeps_every_thread_on_its_cores():
    import os
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and 2 usable cores")
    code = ("import os, threading, time; from cluster.runtime import bind_to_cores; "
            "t = threading.Thread(target=time.sleep, args=(2,)); t.start(); n = len(os.sched_getaffinity(0)); "
            "cores = bind_to_cores(1, n, 1); "
            "print(cores, sorted({frozenset(os.sched_getaffinity(int(x))) == frozenset(cores) for x in os.listdir('/proc/self/task')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "[True]" and out[0].startswith("[")  # every thread, the one started before too


def test_local_storage_path_needs_every_rank_on_the_driver_node_or_shared():
    from cluster.runtime import check_storage_shared

    check_storage_shared("runs", False, "head", {"head"})  # one node: the default works
    check_storage_shared("s3://b/p", False, "head", {"w1", "w2"})  # object storage: any node
    check_storage_shared("/mnt/nfs/runs", True, "head", {"head", "w1"})  # declared shared
    with pytest.raises(ConfigError, match=r"checkpoint\.storage_path.*'runs'.*1 node\(s\) besides.*checkpoint\.shared=true"):
        check_storage_shared("runs", False, "head", {"head", "w1"})
    with pytest.raises(ConfigError, match=r"no CPUs or GPUs.*checkpoint\.shared=true"):  # KubeRay: a head with num-cpus 0
        check_storage_shared("file:///runs", False, "head", {"w1"})
    with pytest.raises(ConfigError, match=r"checkpoint\.shared"):  # nothing can host a worker yet (autoscaling)
        check_storage_shared("runs", False, "head", set())


def test_ray_train_storage_is_the_runs_storage(tmp_path):
    import pyarrow.fs

    from cluster.train_pool import ray_storage
    from system.data.storage import RetryingS3FileSystem

    path, fs = ray_storage(cfg(f"checkpoint.storage_path={tmp_path}"))
    assert path == str(tmp_path / "r" / "ray_train") and fs is None
    path, fs = ray_storage(cfg("checkpoint.storage_path=s3://bucket/exp", "data.storage.endpoint_url=http://h:1",
                               "data.storage.retry_budget_s=90"))
    assert path == "bucket/exp/r/ray_train" and isinstance(fs, pyarrow.fs.PyFileSystem)
    inner = fs.handler.fs
    assert isinstance(inner, RetryingS3FileSystem) and inner.retry_budget_s == 90 and inner.assume_reachable
