"""fsspec access to shard storage (a local folder or s3://bucket/prefix) with clear errors.

Transient S3 errors are retried by botocore (`StorageConfig.max_attempts` / `retry_mode`), not by
a loop here. A missing object raises `FileNotFoundError` naming its full URL; an endpoint that
cannot be reached or refuses our credentials raises `StorageError` naming the URL and endpoint.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec

from system.config.sections import StorageConfig


class StorageError(RuntimeError):
    """Object storage cannot be used: unreachable endpoint, bad or missing credentials."""


def protocol(url: str) -> str:
    """'s3' for s3://..., 'file' for a plain path or file://..."""
    return url.split("://", 1)[0] if "://" in url else "file"


def join(url: str, *parts: str) -> str:
    """Join URL components with '/' (works for local paths and s3://)."""
    out = url.rstrip("/")
    for p in parts:
        if p.strip("/"):
            out = f"{out}/{p.strip('/')}"
    return out


def storage_options(url: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """fsspec keyword arguments for `url` from a `StorageConfig` (empty for local paths)."""
    storage = storage or StorageConfig()
    if protocol(url) not in ("s3", "s3a"):
        return {}
    client: dict[str, Any] = {}
    if storage.endpoint_url:
        client["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client["region_name"] = storage.region
    opts: dict[str, Any] = {
        "anon": storage.anon,
        "client_kwargs": client,
        "config_kwargs": {"retries": {"max_attempts": storage.max_attempts, "mode": storage.retry_mode}},
    }
    if storage.key:
        opts["key"] = storage.key
    if storage.secret:
        opts["secret"] = storage.secret
    return opts


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `url`."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url, storage))
    return fs, path


def endpoint_of(url: str, storage: StorageConfig | None) -> str:
    if protocol(url) == "file":
        return "local filesystem"
    ep = storage.endpoint_url if storage and storage.endpoint_url else "the default AWS endpoint"
    return f"endpoint {ep}"


def storage_error(url: str, storage: StorageConfig | None, err: BaseException) -> Exception:
    """Translate a low-level error while touching `url` into FileNotFoundError / StorageError."""
    if isinstance(err, (FileNotFoundError, StorageError)):
        return err
    name = type(err).__name__
    where = endpoint_of(url, storage)
    if isinstance(err, PermissionError) or "Credentials" in name or "AccessDenied" in str(err):
        hint = "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage.key/secret)"
    elif "Connect" in name or "Endpoint" in name or isinstance(err, (ConnectionError, TimeoutError)):
        hint = "check that the endpoint is reachable (storage.endpoint_url)"
    else:
        hint = "check the URL, the endpoint and the credentials"
    return StorageError(f"cannot access {url} at {where}: {name}: {err}; {hint}")


def check_readable(url: str, storage: StorageConfig | None = None) -> dict:
    """Cheap probe (`fs.info`) of one object; raises FileNotFoundError / StorageError naming `url`."""
    try:
        fs, path = filesystem(url, storage)
        return fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {url} ({endpoint_of(url, storage)})") from None
    except Exception as e:  # noqa: BLE001 - translated into a clear message
        raise storage_error(url, storage, e) from e


def read_bytes(url: str, storage: StorageConfig | None = None) -> bytes:
    """Whole object as bytes; FileNotFoundError / StorageError naming `url`."""
    try:
        fs, path = filesystem(url, storage)
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {url} ({endpoint_of(url, storage)})") from None
    except Exception as e:  # noqa: BLE001
        raise storage_error(url, storage, e) from e


def read_json(url: str, storage: StorageConfig | None = None) -> Any:
    return json.loads(read_bytes(url, storage))


def exists(url: str, storage: StorageConfig | None = None) -> bool:
    try:
        fs, path = filesystem(url, storage)
        return fs.exists(path)
    except Exception as e:  # noqa: BLE001
        raise storage_error(url, storage, e) from e


def open_atomic_write(url: str, storage: StorageConfig | None = None):
    """A writable binary file that appears at `url` only once closed without error.

    Local: written to a temporary name in the same folder, renamed on success. S3: an object
    becomes visible only when its upload completes (on close), so it is written in place.
    """
    return _AtomicWriter(url, storage)


class _AtomicWriter:
    def __init__(self, url: str, storage: StorageConfig | None):
        self.url = url
        self.fs, self.path = filesystem(url, storage)
        self.local = protocol(url) == "file"
        if self.local:
            parent = os.path.dirname(self.path)
            os.makedirs(parent, exist_ok=True)
            self.tmp = os.path.join(parent, f".{os.path.basename(self.path)}.tmp-{uuid.uuid4().hex[:8]}")
            self.f = open(self.tmp, "wb")
        else:
            self.f = self.fs.open(self.path, "wb")

    def write(self, data: bytes) -> int:
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.f.close()
            if self.local:
                os.replace(self.tmp, self.path)
            return
        if self.local:
            self.f.close()
            os.unlink(self.tmp)
        else:  # abandon the upload: nothing becomes visible
            try:
                self.f.discard()
            finally:
                self.f.closed = True  # keep close()/__del__ from completing the upload


def write_bytes_atomic(url: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write `data` to `url`; it appears complete or not at all."""
    try:
        with open_atomic_write(url, storage) as f:
            f.write(data)
    except (FileNotFoundError, StorageError):
        raise
    except Exception as e:  # noqa: BLE001
        raise storage_error(url, storage, e) from e
