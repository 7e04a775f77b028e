import time
import uuid

import pytest
from s3_restartable import RestartableS3
import s3fs

from system.config import StorageConfig
from system.data.storage import (
    StorageError,
    check_readable,
    filesystem,
    read_bytes,
    storage_options,
    write_bytes_atomic,
)


def test_storage_options_s3_and_local():
    st = StorageConfig(endpoint_url="http://h:1", region="eu-west-1", key="K", secret="S", max_attempts=7, retry_mode="adaptive")
    opts = storage_options("s3://b/p", st)
    assert opts["client_kwargs"] == {"endpoint_url": "http://h:1", "region_name": "eu-west-1"}
    assert opts["key"] == "K" and opts["secret"] == "S" and opts["anon"] is False
    assert opts["config_kwargs"] == {"retries": {"max_attempts": 7, "mode": "adaptive"}}
    assert "key" not in storage_options("s3://b/p", StorageConfig())
    assert storage_options("/tmp/x", st) == {}
    fs, path = filesystem("s3://b/p/x.tar", st)
    assert isinstance(fs, s3fs.S3FileSystem) and path == "b/p/x.tar"


def test_local_missing_names_url(tmp_path):
    url = str(tmp_path / "nope" / "index.json")
    with pytest.raises(FileNotFoundError, match=url):
        read_bytes(url)


def test_atomic_write_local(tmp_path):
    url = str(tmp_path / "a" / "f.bin")
    write_bytes_atomic(url, b"abc")
    assert read_bytes(url) == b"abc"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["f.bin"]  # no temp file left


def test_s3_missing_and_atomic(s3_server):
    st = StorageConfig(endpoint_url=s3_server)
    fs, _ = filesystem("s3://storage-test", st)
    fs.mkdir("storage-test")
    with pytest.raises(FileNotFoundError, match="s3://storage-test/x/index.json"):
        check_readable("s3://storage-test/x/index.json", st)
    write_bytes_atomic("s3://storage-test/x/f.bin", b"data", st)
    assert read_bytes("s3://storage-test/x/f.bin", st) == b"data"
    from system.data.storage import open_atomic_write

    with pytest.raises(RuntimeError):
        with open_atomic_write("s3://storage-test/x/broken.bin", st) as f:
            f.write(b"partial")
            raise RuntimeError("writer died")
    fs.invalidate_cache()
    assert not fs.exists("storage-test/x/broken.bin")


def test_unreachable_endpoint_is_storage_error():
    st = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(StorageError) as e:
        check_readable("s3://bucket/shards/index.json", st)
    assert "s3://bucket/shards/index.json" in str(e.value) and "http://127.0.0.1:9" in str(e.value)


def test_credential_errors_are_named():
    from botocore.exceptions import NoCredentialsError

    from system.data.storage import storage_error

    st = StorageConfig(endpoint_url="http://minio:9000")
    for err in (NoCredentialsError(), PermissionError("Access Denied")):
        e = storage_error("s3://b/imagenet/train/index.json", st, err)
        assert isinstance(e, StorageError)
        assert "s3://b/imagenet/train/index.json" in str(e) and "http://minio:9000" in str(e) and "credentials" in str(e)


# ---------------------------------------------------------------------------- retry over a budget
@pytest.fixture
def endpoint(s3_server, monkeypatch):
    """A restartable S3 endpoint with a bucket; this process's memory of reachable endpoints is reset."""
    import system.data.storage as storage

    monkeypatch.setattr(storage, "_reached", set())
    monkeypatch.delenv(storage.REACHED_ENV, raising=False)
    srv = RestartableS3().start()
    srv.bucket = f"outage-{uuid.uuid4().hex[:8]}"  # moto's objects outlive a server: one bucket per test
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": srv.url}, skip_instance_cache=True).mkdir(srv.bucket)
    yield srv
    srv.stop()


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_transient_errors_are_told_apart():
    import errno

    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError
    from s3fs.errors import translate_boto_error

    from system.data.storage import is_transient

    transient = [EndpointConnectionError(endpoint_url="http://h"), ReadTimeoutError(endpoint_url="http://h"),
                 ConnectionRefusedError(), ConnectionResetError(), TimeoutError(), _client_error("SlowDown", 503),
                 _client_error("InternalError", 500), _client_error("Whatever", 502), _client_error("TooManyRequests", 429),
                 translate_boto_error(_client_error("ServiceUnavailable", 503)), OSError(errno.ECONNRESET, "reset")]
    never = [FileNotFoundError("x"), PermissionError("x"), NoCredentialsError(), _client_error("NoSuchKey", 404),
             _client_error("AccessDenied", 403), translate_boto_error(_client_error("NoSuchKey", 404)),
             translate_boto_error(_client_error("InvalidRange", 416)), ValueError("bad"), OSError(errno.EINVAL, "bad")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in never] == [False] * len(never)


def test_backoff_grows_with_jitter_up_to_the_cap():
    from system.data.storage import backoff_s

    for attempt, d in [(0, 0.5), (1, 1.0), (3, 4.0), (10, 30.0), (100, 30.0)]:
        waits = [backoff_s(attempt, 30.0) for _ in range(50)]
        assert all(d / 2 <= w <= d for w in waits) and len(set(waits)) > 1


def test_retries_leave_the_global_random_state_alone():
    """The jitter has a generator of its own: the global `random` state is checkpointed (rng.pt),
    so waiting out an outage must not draw from it."""
    import asyncio
    import random

    from system.data.storage import backoff_s, retry_transient

    random.seed(1)
    before = random.getstate()
    waits = [backoff_s(a, 0.01) for a in range(20)]
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError("dropped")
        return "ok"

    assert asyncio.run(retry_transient(flaky, budget_s=5, max_delay_s=0.01, key="k", trusted=True)) == "ok"
    assert len(calls) == 4 and len(set(waits)) > 1
    assert random.getstate() == before


@pytest.mark.parametrize("mode", ["standard", "legacy"])
def test_botocores_own_retries_leave_the_global_random_state_alone(mode):
    """botocore's retries (max_attempts) jitter their back-off too: with a generator of their own
    (storage.py), a refused endpoint retried by botocore leaves the checkpointed `random` state."""
    import random

    random.seed(2)
    before = random.getstate()
    st = StorageConfig(endpoint_url="http://127.0.0.1:9", key="k", secret="s", max_attempts=2, retry_mode=mode,
                       retry_budget_s=0)
    t0 = time.monotonic()
    with pytest.raises(StorageError):
        check_readable("s3://bucket/shards/index.json", st)
    assert time.monotonic() - t0 > 0.05  # botocore did wait between its attempts
    assert random.getstate() == before


def test_outage_longer_than_botocore_retries_needs_the_budget(endpoint):
    """botocore left one attempt ("today's limit": the first refused connection): an outage of a few
    seconds fails a read and a write without the budget, and with it both complete, nothing lost."""
    url = f"s3://{endpoint.bucket}/run/f.bin"
    off = StorageConfig(endpoint_url=endpoint.url, max_attempts=1, retry_budget_s=0)
    on = StorageConfig(endpoint_url=endpoint.url, max_attempts=1, retry_budget_s=60, retry_max_delay_s=1)
    write_bytes_atomic(url, b"before", on)  # the endpoint has answered: outages are retried from now on
    endpoint.stop()
    with pytest.raises(StorageError, match=url):
        read_bytes(url, off)
    with pytest.raises(StorageError, match=f"s3://{endpoint.bucket}/run/g.bin"):
        write_bytes_atomic(f"s3://{endpoint.bucket}/run/g.bin", b"x", off)
    t = endpoint.restart_after(3.0)
    t0 = time.monotonic()
    assert read_bytes(url, on) == b"before"  # waits the outage out
    assert time.monotonic() - t0 >= 2.5
    t.join()
    endpoint.stop()
    t = endpoint.restart_after(3.0)
    write_bytes_atomic(f"s3://{endpoint.bucket}/run/g.bin", b"during", on)
    t.join()
    fs, _ = filesystem(url, off)
    fs.invalidate_cache()
    assert read_bytes(f"s3://{endpoint.bucket}/run/g.bin", off) == b"during" and read_bytes(url, off) == b"before"
    assert sorted(fs.ls(f"{endpoint.bucket}/run")) == [f"{endpoint.bucket}/run/f.bin", f"{endpoint.bucket}/run/g.bin"]


def test_budget_is_a_bound_and_errors_are_not_retried(endpoint):
    st = StorageConfig(endpoint_url=endpoint.url, max_attempts=1, retry_budget_s=2, retry_max_delay_s=0.5)
    write_bytes_atomic(f"s3://{endpoint.bucket}/a", b"a", st)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match=f"s3://{endpoint.bucket}/missing"):  # not retried
        read_bytes(f"s3://{endpoint.bucket}/missing", st)
    assert time.monotonic() - t0 < 1.5
    endpoint.stop()
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=f"s3://{endpoint.bucket}/a"):
        read_bytes(f"s3://{endpoint.bucket}/a", st)
    assert 1.5 <= time.monotonic() - t0 < 6  # the budget, then the error


def test_never_reached_endpoint_fails_at_once_unless_assumed_reachable(endpoint):
    """A wrong endpoint_url is said at once (no budget spent); a process told that the endpoint works
    (a training worker after the driver's checks) waits for it from the first request on."""
    from system.data.storage import assume_reachable

    st = StorageConfig(endpoint_url=endpoint.url, max_attempts=1, retry_budget_s=60, retry_max_delay_s=1)
    endpoint.stop()
    t0 = time.monotonic()
    with pytest.raises(StorageError):
        read_bytes(f"s3://{endpoint.bucket}/x", st)
    assert time.monotonic() - t0 < 5
    t = endpoint.restart_after(2.0)
    fs, path = filesystem(f"s3://{endpoint.bucket}/x", st, assume_reachable=True)  # e.g. Ray Train's storage filesystem
    assert not fs.exists(path)
    t.join()
    endpoint.stop()
    assume_reachable(st)  # this process and its children
    t = endpoint.restart_after(2.0)
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{endpoint.bucket}/x", st)  # reached after the outage: a real answer
    t.join()
