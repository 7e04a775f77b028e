"""A real forward + backward of a GPT on the CPU, its peak resident-set growth measured (run in a
spawned process: it pins glibc's mmap threshold so freed tensors return to the OS and RSS follows
the live bytes)."""
from __future__ import annotations

import ctypes
import threading
import time


def real_step_peak(cfg, batch: int) -> int:
    import psutil
    import torch

    from system.models.gpt import GPT

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 65536)  # M_TRIM_THRESHOLD
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    codes = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    labels = torch.zeros(batch, dtype=torch.long)
    proc, samples, stop = psutil.Process(), [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(proc.memory_info().rss)
            time.sleep(0.0005)

    base = proc.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    model(codes, labels).float().mean().backward()
    stop.set()
    thread.join()
    return max(samples) - base
