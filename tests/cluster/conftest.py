"""Fixtures for cluster/ tests: a one-process gloo group (DeepSpeed without Ray)."""
from __future__ import annotations

import os
import socket

import pytest

_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")  # LOCAL_RANK stays: DeepSpeed reads it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def dist_world1():
    """torch.distributed with world size 1 (gloo), as DeepSpeed needs a process group. Session-wide
    (DeepSpeed caches the group); the rendezvous environment is restored at once, so Ray workers
    started later in the session inherit none of it (Ray Train sets their LOCAL_RANK itself)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        saved = {k: os.environ.get(k) for k in _DIST_ENV}
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        try:
            dist.init_process_group("gloo", rank=0, world_size=1)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    yield dist


@pytest.fixture
def bucket(s3_server):
    """A new bucket on the local S3 endpoint: (s3fs filesystem, bucket name)."""
    import uuid

    import s3fs

    name = f"b-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir(name)
    return fs, name
