import pytest
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
