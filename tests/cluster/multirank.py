"""Run a function on N ranks as spawned processes with a gloo group (DeepSpeed without Ray), for
tests that need more than one rank but not Ray Train: `run_ranks(fn, world, *args)` returns each
rank's return value; a rank's exception fails the test with that rank's traceback."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, out: str, args: tuple, env: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env)
    code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result: Any = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result, code = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"), 1
    with open(out, "wb") as f:
        pickle.dump(result, f)
    os._exit(code)  # no teardown of DeepSpeed / gloo threads (they may abort at interpreter exit)


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 600, env: dict | None = None) -> list[Any]:
    """`fn(rank, world, *args)` on `world` spawned processes (torch.distributed gloo initialised);
    returns the ranks' results in rank order. `fn` and `args` must pickle (a module-level function)."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as d:
        outs = [os.path.join(d, f"rank{r}.pkl") for r in range(world)]
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, outs[r], args, env or {}), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:
            for p in procs:  # only the processes started here
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
                    p.join()
        results, errors = [], []
        for r, (p, out) in enumerate(zip(procs, outs)):
            if not os.path.exists(out):
                errors.append(f"rank {r}: exited with {p.exitcode} without a result (timeout {timeout}s or killed)")
                continue
            with open(out, "rb") as f:
                kind, value = pickle.load(f)
            (errors if kind == "error" else results).append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        return results
