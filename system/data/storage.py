"""fsspec access to shard storage (a local folder or s3://bucket/prefix) with clear errors.

Transient S3 errors are retried twice over: first by botocore (`StorageConfig.max_attempts` /
`retry_mode`, seconds), then, for every request of the project (all of it goes through
`filesystem()`: small files, checkpoints, shards, Ray Train's storage), with exponential back-off
and jitter for up to `StorageConfig.retry_budget_s` (minutes) before the error counts: an endpoint
that refuses or drops connections, times out, answers 5xx or throttles. A missing object, a denied
request or bad credentials are never retried. An endpoint this process has never reached fails at
once (a wrong `endpoint_url` is a configuration error, said in one line), unless the process was
told that it works (`assume_reachable`: the training workers, after the driver listed the run).

A missing object raises `FileNotFoundError` naming its full URL; an endpoint that cannot be reached
(or stays unreachable for the whole budget) or refuses our credentials raises `StorageError`
naming the URL and endpoint. Local folders are used as they are (no retry).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import json
import logging
import os
import random
import time
import uuid
from typing import Any, Iterator

import fsspec

from system.config.sections import StorageConfig

log = logging.getLogger(__name__)

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


def filesystem(url: str, storage: StorageConfig | None = None, *,
               assume_reachable: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `url`. For object storage, a `RetryingS3FileSystem`: every
    request retried over `storage.retry_budget_s` (see the module doc); `assume_reachable`: retry
    from the first request on (the endpoint is known to work; the object travels to other processes
    with this setting, e.g. Ray Train's storage)."""
    if protocol(url) in ("s3", "s3a"):
        st = storage or StorageConfig()
        cls = retrying_s3_class()
        fs = cls(**storage_options(url, st), retry_budget_s=float(st.retry_budget_s),
                 retry_max_delay_s=float(st.retry_max_delay_s), endpoint_key=endpoint_key(st),
                 assume_reachable=assume_reachable)
        return fs, cls._strip_protocol(url)
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url, storage))
    return fs, path


# ---------------------------------------------------------------------------- retrying object storage
REACHED_ENV = "TOKENIZER_AR_STORAGE_REACHED"  # endpoints known to work, inherited by child processes
_reached: set[str] = set()
# names (anywhere in an error's class hierarchy) of errors raised before any HTTP answer
_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "HTTPClientError", "ResponseStreamingError", "IncompleteReadError",
    "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError",
    "ClientOSError", "ServerTimeoutError", "FSTimeoutError", "ResponseParserError", "IncompleteRead",
}
# S3 error codes worth waiting for (throttling and server-side trouble)
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestThrottled", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "OperationAborted", "BandwidthLimitExceeded", "PriorRequestNotComplete", "EC2ThrottledException",
}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EBUSY,
                     getattr(errno, "EREMOTEIO", errno.EIO)}
_NEVER = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


def endpoint_key(storage: StorageConfig | None) -> str:
    """The name under which an endpoint is remembered as reachable."""
    st = storage or StorageConfig()
    return st.endpoint_url or f"aws:{st.region or ''}"


def assume_reachable(storage: StorageConfig | None) -> None:
    """This process (and processes it starts, e.g. DataLoader workers) retries `storage`'s endpoint
    from the first request on: another process has already used it (the driver, before a pool)."""
    key = endpoint_key(storage)
    _reached.add(key)
    known = os.environ.get(REACHED_ENV, "").split()
    if key not in known:
        os.environ[REACHED_ENV] = " ".join([*known, key])


def _is_reached(key: str) -> bool:
    return key in _reached or key in os.environ.get(REACHED_ENV, "").split()


def _chain(err: BaseException) -> list[BaseException]:
    out, e = [], err
    while e is not None and e not in out and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _response(e: BaseException) -> dict | None:
    r = getattr(e, "response", None)
    return r if isinstance(r, dict) and ("Error" in r or "ResponseMetadata" in r) else None


def answered(err: BaseException) -> bool:
    """Whether the endpoint sent an HTTP answer (any status) before `err`."""
    return any(_response(e) is not None for e in _chain(err))


def is_transient(err: BaseException) -> bool:
    """Whether waiting may help: connection refused/reset/closed, timeouts, HTTP 5xx or 429, S3
    throttling codes. Never a missing object, a denied request or missing/bad credentials."""
    for e in _chain(err):
        if isinstance(e, _NEVER):
            return False
        names = {c.__name__ for c in type(e).__mro__}
        if any("Credential" in n for n in names):
            return False
        r = _response(e)
        if r is not None:
            code = str(r.get("Error", {}).get("Code", ""))
            status = int(r.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if names & _CONNECTION_ERRORS or isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


# the retry jitter's own generator: the global `random` state is part of a run's checkpoint (rng.pt),
# and waiting out an outage must not change the run
_jitter = random.Random()


def backoff_s(attempt: int, max_delay_s: float, base_s: float = 0.5) -> float:
    """Wait before retry `attempt` (0, 1, ...): exponential, capped, with jitter in its upper half."""
    d = min(max_delay_s, base_s * 2 ** min(attempt, 30))
    return d / 2 + _jitter.uniform(0, d / 2)


async def retry_transient(call, *, budget_s: float, max_delay_s: float, key: str, what: str = "request",
                          trusted: bool = False) -> Any:
    """`await call()`, retried on transient errors (`is_transient`) with `backoff_s` waits for up to
    `budget_s` seconds in all; an endpoint not yet known to work (`key`) is not retried."""
    start, attempt, said = time.monotonic(), 0, -1e9
    while True:
        try:
            out = await call()
        except Exception as e:  # noqa: BLE001 - re-raised unless transient
            if answered(e):
                _reached.add(key)
            if budget_s <= 0 or not is_transient(e) or not (trusted or _is_reached(key)):
                raise
            elapsed = time.monotonic() - start
            wait = min(backoff_s(attempt, max_delay_s), budget_s - elapsed)
            if wait <= 0:
                log.error("storage %s: %s failed for %.0f s (storage.retry_budget_s=%g): %s: %s", key, what, elapsed,
                          budget_s, type(e).__name__, e)
                raise
            if elapsed - said >= 30 or attempt == 0:
                said = elapsed
                log.warning("storage %s: %s failed (%s: %s); retrying for up to %.0f s more", key, what,
                            type(e).__name__, e, budget_s - elapsed)
            await asyncio.sleep(wait)
            attempt += 1
            continue
        _reached.add(key)
        return out


_RETRYING_S3: Any = None


def _private_botocore_jitter() -> None:
    """botocore's own retries (the first of the two above) draw their jitter from the global `random`
    module, whose state a run checkpoints (rng.pt): an outage would change the run's state. They
    get a generator of their own: the default `random` of `ExponentialBackoff` (standard and adaptive
    retry modes) and the `random` the legacy mode's handler calls. Nothing else changes."""
    try:
        from botocore import retryhandler
        from botocore.retries import standard
    except ImportError:
        return
    own = random.Random()
    init = standard.ExponentialBackoff.__init__
    names = [n for n in inspect.signature(init).parameters if n != "self"]
    defaults = list(init.__defaults__ or ())
    at = names.index("random") - (len(names) - len(defaults)) if "random" in names else -1
    if 0 <= at < len(defaults) and defaults[at] == random.random:
        defaults[at] = own.random
        init.__defaults__ = tuple(defaults)
    if getattr(retryhandler, "random", None) is random:
        retryhandler.random = own


def retrying_s3_class() -> type:
    """`s3fs.S3FileSystem` whose every request (`_call_s3`: objects, listings, uploads, ranged reads
    of open files) goes through `retry_transient`. Built on first use (s3fs is imported only for
    object storage); importable as `system.data.storage.RetryingS3FileSystem`, so instances pickle."""
    global _RETRYING_S3
    if _RETRYING_S3 is None:
        _private_botocore_jitter()
        import s3fs
        from fsspec.asyn import sync_wrapper

        class RetryingS3FileSystem(s3fs.S3FileSystem):
            def __init__(self, *args, retry_budget_s: float = 0.0, retry_max_delay_s: float = 30.0,
                         endpoint_key: str = "", assume_reachable: bool = False, **kwargs):
                super().__init__(*args, **kwargs)
                self.retry_budget_s, self.retry_max_delay_s = retry_budget_s, retry_max_delay_s
                self.endpoint_key, self.assume_reachable = endpoint_key, assume_reachable

            async def _call_s3(self, method, *akwarglist, **kwargs):
                parent = super()._call_s3
                return await retry_transient(lambda: parent(method, *akwarglist, **kwargs), budget_s=self.retry_budget_s,
                                             max_delay_s=self.retry_max_delay_s, key=self.endpoint_key,
                                             what=f"{method} {kwargs.get('Bucket', '')}/{kwargs.get('Key', kwargs.get('Prefix', ''))}",
                                             trusted=self.assume_reachable)

            call_s3 = sync_wrapper(_call_s3)  # s3fs's file objects call this one

        RetryingS3FileSystem.__module__, RetryingS3FileSystem.__qualname__ = __name__, "RetryingS3FileSystem"
        _RETRYING_S3 = RetryingS3FileSystem
    return _RETRYING_S3


def __getattr__(name: str) -> Any:  # PEP 562: `RetryingS3FileSystem` without importing s3fs at import time
    if name == "RetryingS3FileSystem":
        return retrying_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


_PLANNED: list[dict[str, bytes]] = []  # stacked `planned_files` overlays (a dry run's files of steps not run)


@contextlib.contextmanager
def planned_files(files: dict[str, bytes]) -> Iterator[dict[str, bytes]]:
    """Inside, `read_bytes` / `exists` see `files` ({url: bytes}) as if they were stored: what earlier
    steps of a pipeline would write (an export's model.json, a shard set's index.json), so a dry run
    checks and plans a later step before those steps ever ran. Yields the dict (add to it freely)."""
    _PLANNED.append(files)
    try:
        yield files
    finally:
        _PLANNED.remove(files)


def _planned(url: str) -> bytes | None:
    key = url.rstrip("/")
    for files in reversed(_PLANNED):
        if key in files:
            return files[key]
    return None


def read_bytes(url: str, storage: StorageConfig | None = None) -> bytes:
    """Whole object as bytes; FileNotFoundError / StorageError naming `url`."""
    planned = _planned(url)
    if planned is not None:
        return planned
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
    if _planned(url) is not None:
        return True
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
