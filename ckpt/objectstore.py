"""Object-store roots (``s3://bucket/path``, ``gs://bucket/path``) through tensorstore's kvstore drivers.

An object store has no rename: a step is written in place under its final name, and its
``manifest.json``, written last, is the commit record. Steps without one are not listed; those that
hold ckpt's marker (``.ckpt-owned``, written first) are removed by the next writer, others are never
touched. Deletion removes the manifest first and the marker last; a save in place of a step (``overwrite``)
writes the marker before it removes the old step and keeps it.

S3 settings come from the usual environment variables: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
(e.g. a local S3-compatible server; the first wins, as in AWS's SDKs), ``AWS_REGION`` (or
``AWS_DEFAULT_REGION``; when neither is set, tensorstore asks the bucket's region), and the credentials:
``AWS_ACCESS_KEY_ID`` (with ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN``) when set, else AWS's usual
chain (``~/.aws``, the instance's role).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import json
import os
from typing import Any, Callable, Iterable, Iterator, TypeVar

import tensorstore as ts

T = TypeVar("T")

SCHEMES = {"s3": "s3", "gs": "gcs"}
_REFUSED = ("PERMISSION_DENIED", "UNAUTHENTICATED")  # tensorstore's status of a request refused (403, 401)
_UNSERVED = ("UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")  # (after tensorstore's retries)
_FIRST_CONTACT = {"max_retries": 3, "initial_delay": "0.5s", "max_delay": "2s"}  # (tensorstore's: 32, 1 s, 32 s)
_UNANSWERED = "[curl_code="  # in tensorstore's error for a request no server answered (refused, host unknown)
_OS_ERROR = "[os_error_code="  # in tensorstore's error for a system call that failed (a local file)


@functools.lru_cache(maxsize=None)
def _bucket(spec: str) -> ts.KvStore:
    """The store of a bucket, opened once for each kvstore spec (its JSON, keys sorted), once its server has
    answered a first request made with few retries (seconds; any answer will do, a 404 or a 403): a server out
    of reach (a wrong endpoint, no network) raises tensorstore's error then, where each request retries for
    about 15 minutes, as later requests still do (a server's brief outage during a run)."""
    parsed = json.loads(spec)
    first = ts.KvStore.open({**parsed, "context": {f"{parsed['driver']}_request_retries": _FIRST_CONTACT}}).result()
    try:
        first.read(b"ckpt-first-contact", byte_range=slice(0, 0)).result()
    except ValueError as e:
        if _UNANSWERED in str(e):
            raise
    return ts.KvStore.open(parsed).result()


def access_error(error: ValueError, what: str) -> OSError | None:
    """tensorstore's ``error`` as the OSError to raise, naming ``what``, when the store refused the request
    (credentials, permissions: a PermissionError) or could not serve it (a server down or unreachable, once
    tensorstore's retries are spent); None for any other error, one about what was read (a missing or
    malformed object), which a load reports as damage. The server's XML is left out."""
    text = str(error)
    status, short = text.split(":", 1)[0], text.split(" [", 1)[0]
    if status in _REFUSED and _OS_ERROR in text:  # a local file this process may not read: no credentials asked
        return PermissionError(errno.EACCES, f"{what}: access denied ({short})")
    if status in _REFUSED:
        return PermissionError(errno.EACCES, f"{what}: access denied ({short}); check the credentials (for s3://, "
                               "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) and what they may do there")
    if status in _UNSERVED:
        return OSError(errno.EIO, f"{what}: the store did not answer ({short}); check the endpoint (for s3://, "
                       "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and the network")
    return None


@contextlib.contextmanager
def access_errors(what: str) -> Iterator[None]:
    """Re-raises a tensorstore error of the block that :func:`access_error` recognises as its OSError naming
    ``what``; any other passes as it is."""
    try:
        yield
    except ValueError as e:
        error = access_error(e, what)
        if error is None:
            raise
        raise error from None


@functools.lru_cache(maxsize=None)
def _invalid_bucket(scheme: str, bucket: str) -> bool:
    """Whether the store's driver refuses ``bucket`` as a bucket's name (``s3://ab``, ``gs://My_Bucket``); no
    request is made."""
    try:
        ts.KvStore.Spec({"driver": SCHEMES[scheme], "bucket": bucket})
    except ValueError:
        return True
    return False


_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # S3's own first, as AWS's SDKs and CLI read them


def _endpoint(url: str) -> str | None:
    """The endpoint the environment gives S3 (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``; None when
    neither is set), checked for ``url``: ValueError, naming the variable and the URL, when it is not an
    http:// or https:// URL (tensorstore's error named neither)."""
    name, endpoint = _endpoint_setting()
    problem = endpoint and _endpoint_problem(endpoint)
    if problem:
        raise ValueError(f"{url}: {name} is {endpoint!r}, {problem}")
    return endpoint


def _endpoint_setting() -> tuple[str, str | None]:
    """The variable that gives S3 its endpoint and its value: ``AWS_ENDPOINT_URL_S3``'s, else ``AWS_ENDPOINT_URL``'s
    (``("", None)`` when neither is set)."""
    return next(((name, os.environ[name]) for name in _ENDPOINT_VARIABLES if os.environ.get(name)), ("", None))


def _endpoint_path() -> str:
    """For the error of a request that failed, a word on the S3 endpoint's path where it has one
    (``http://host:9000/bucket``): tensorstore sends every request below it, where few servers answer; else ''."""
    name, endpoint = _endpoint_setting()
    path = endpoint.partition("://")[2].partition("/")[2] if endpoint else ""
    if not path.strip("/"):
        return ""
    return (f"; {name} is {endpoint!r}, whose path (/{path}) every request is sent below: give the server's address "
            f"alone ({endpoint[:-len(path) - 1]}) unless the server is served there")


def _endpoint_problem(endpoint: str) -> str | None:
    """What tensorstore would refuse in an S3 endpoint, in words for the user (None: nothing found)."""
    if any(c.isspace() for c in endpoint):  # (tensorstore's curl error named neither the variable nor the space)
        return "which holds white space: remove it"
    scheme, separator, rest = endpoint.partition("://")
    if separator and scheme in ("http", "https"):
        return None if rest.split("/", 1)[0] else "which names no host: give one (such as http://127.0.0.1:9000)"
    if separator and scheme.lower() in ("http", "https"):  # (tensorstore: lowercase only)
        return f"which is not an http:// or https:// URL: write its scheme in lowercase ({scheme.lower()}://{rest})"
    if separator or endpoint.lower().startswith("http"):  # another scheme, or a slash or colon lost (http:/host)
        return "which is not an http:// or https:// URL (such as http://127.0.0.1:9000 or https://s3.example.com)"
    return f"which is not an http:// or https:// URL; give its scheme too (such as http://{endpoint})"


REQUESTS_AT_ONCE = 32  # requests in flight at once in :func:`each` (each mostly waits on the network)


@functools.cache
def _request_threads() -> concurrent.futures.ThreadPoolExecutor:
    """The threads of :func:`each` (made once per process; a forked child, which has none of its parent's
    threads, makes its own)."""
    return concurrent.futures.ThreadPoolExecutor(REQUESTS_AT_ONCE, thread_name_prefix="ckpt-request")


os.register_at_fork(after_in_child=_request_threads.cache_clear)


def each(function: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    """``[function(item) for item in items]``, several at once: for requests to an object store, where one after
    another each waits a round trip (the manifests of a root of 200 steps, 30 ms away: 6.5 s). The first
    error is raised once all are done."""
    futures = [_request_threads().submit(function, item) for item in items]
    concurrent.futures.wait(futures)
    return [future.result() for future in futures]


def is_url(directory: Any) -> bool:
    """Whether ``directory`` is an s3:// or gs:// URL: a string, an :class:`ObjectPath`, or a path object that
    keeps the URL whole (``etils.epath.Path("gs://bucket/run")``, as code written for Orbax passes)."""
    if isinstance(directory, os.PathLike):
        directory = os.fspath(directory)
    return isinstance(directory, (str, ObjectPath)) and str(directory).split("://", 1)[0] in SCHEMES


class ObjectPath:
    """A path in a bucket that behaves like the ``pathlib.Path`` operations ckpt uses, and those a handler
    (:mod:`ckpt.handlers`) reads and writes its files with: ``read_text``, ``write_text``, ``read_bytes``,
    ``write_bytes``, ``exists``.

    Example::

        step = ObjectPath("s3://bucket/runs/exp1") / "100"   # no request is made until read or listed
        assert (step.bucket, step.key, step.name) == ("bucket", "runs/exp1/100", "100")
        assert str(step.parent) == "s3://bucket/runs/exp1"
    """

    def __init__(self, url: str):
        scheme, _, rest = str(url).partition("://")
        bucket, _, key = rest.partition("/")
        if scheme not in SCHEMES or not bucket:
            raise ValueError(f"{url!r} is not an object-store URL like s3://bucket/path")
        if _invalid_bucket(scheme, bucket):  # (tensorstore's error at the first request named neither URL nor root)
            raise ValueError(f"{url!r} does not name a bucket: {bucket!r} is not a valid {scheme}:// bucket name")
        if scheme == "s3":
            _endpoint(url)
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"{url!r} has '.' or '..' in its path")
        self.scheme, self.bucket, self.key = scheme, bucket, "/".join(parts)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str) -> "ObjectPath":
        return ObjectPath(f"{self}/{name}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(f"{self.scheme}://{self.bucket}/{self.key.rsplit('/', 1)[0] if '/' in self.key else ''}")

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def kvstore(self) -> dict:
        """The tensorstore kvstore spec of this path, as a directory (trailing slash)."""
        spec: dict[str, Any] = {"driver": SCHEMES[self.scheme], "bucket": self.bucket,
                                "path": f"{self.key}/" if self.key else ""}
        if self.scheme == "s3":
            if endpoint := _endpoint(str(self)):
                spec["endpoint"] = endpoint
            if region := os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION")):
                spec["aws_region"] = region
            if os.environ.get("AWS_ACCESS_KEY_ID"):  # (else the default chain logs 5 errors a store: no ~/.aws/config)
                spec["aws_credentials"] = {"type": "environment"}
        return spec

    def _store(self) -> ts.KvStore:
        """The bucket's store; an OSError naming this path when its server does not answer (see :func:`_bucket`)."""
        try:
            return _bucket(json.dumps({**self.kvstore(), "path": ""}, sort_keys=True))
        except ValueError as e:
            raise self._failure(e) from None

    def _wait(self, future: ts.Future) -> Any:
        """``future.result()`` of a request about this path; a failure is raised as :meth:`_failure`'s OSError."""
        try:
            return future.result()
        except ValueError as e:
            raise self._failure(e) from None

    def _failure(self, error: ValueError) -> OSError:
        """tensorstore's ``error`` about this path as an OSError that names the path, without the server's XML:
        FileNotFoundError for a bucket that does not exist, PermissionError for a request refused, OSError for
        one not served (see :func:`access_error`), else OSError with tensorstore's text. Where the S3 endpoint has a
        path, the first and the last say so (:func:`_endpoint_path`)."""
        endpoint_path = _endpoint_path() if self.scheme == "s3" else ""
        if "NoSuchBucket" in str(error):
            return FileNotFoundError(errno.ENOENT, f"{self}: the bucket {self.bucket!r} does not exist (ckpt creates "
                                     "none: create it, or check its name and AWS_ENDPOINT_URL_S3 or "
                                     f"AWS_ENDPOINT_URL){endpoint_path}")
        return access_error(error, str(self)) or OSError(errno.EIO, f"{self}: {error}{endpoint_path}")

    def read_bytes(self, limit: int | None = None) -> bytes:
        """The object's bytes; FileNotFoundError when it is missing. With ``limit``, ValueError for an object of more
        than ``limit`` bytes, before its bytes are fetched: a request for its byte at offset ``limit`` comes first (a
        store answers it with that one byte, or with 'range not satisfiable' for an object of at most ``limit``
        bytes), since tensorstore tells no object's size and refuses a range read past an object's end."""
        if limit is not None and self._holds_byte(limit):
            raise ValueError(f"{self} has more than the {limit} bytes a reader accepts")
        result = self._wait(self._store().read(self.key.encode()))
        if result.state != "value":
            raise FileNotFoundError(f"{self} does not exist")
        return bytes(result.value)

    def _holds_byte(self, offset: int) -> bool:
        """Whether the object has a byte at ``offset`` (one byte fetched at most); FileNotFoundError when missing."""
        try:
            result = self._store().read(self.key.encode(), byte_range=slice(offset, offset + 1)).result()
        except ValueError as e:
            if str(e).startswith("OUT_OF_RANGE"):  # (the store's 416: the object ends before offset)
                return False
            raise self._failure(e) from None
        if result.state != "value":
            raise FileNotFoundError(f"{self} does not exist")
        return True

    def write_bytes(self, data: bytes) -> None:
        self._wait(self._store().write(self.key.encode(), data))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_text(self, data: str, encoding: str = "utf-8") -> None:
        self.write_bytes(data.encode(encoding))

    def _prefix_range(self) -> ts.KvStore.KeyRange:
        prefix = f"{self.key}/".encode() if self.key else b""
        return ts.KvStore.KeyRange(prefix, prefix[:-1] + b"0" if prefix else b"")

    def _is_object(self, key: str) -> bool:
        # (reading no bytes asks for the object's metadata only, not its bytes)
        return self._wait(self._store().read(key.encode(), byte_range=slice(0, 0))).state == "value"

    def holds(self, name: str) -> bool:
        """Whether the object ``name`` is directly below this path: one request, whose failure names this path."""
        return self._is_object(f"{self.key}/{name}" if self.key else name)

    def exists(self) -> bool:
        """True for an object, or a 'directory' holding at least one object (a bucket: one not empty)."""
        if self.key and self._is_object(self.key):  # (no object has the empty key)
            return True
        return bool(self._wait(self._store().list(self._prefix_range())))

    def keys(self) -> list[str]:
        """Every key below this path, relative to it (``100/manifest.json``), from one listing."""
        n = len(self.key) + 1 if self.key else 0
        return [key.decode()[n:] for key in self._wait(self._store().list(self._prefix_range()))]

    def children(self) -> list[str]:
        """The names directly below this path."""
        return sorted({key.split("/", 1)[0] for key in self.keys()})

    def unlink(self) -> None:
        """Deletes this one object (none is fine)."""
        self._wait(self._store().delete_range(ts.KvStore.KeyRange(self.key.encode(), self.key.encode() + b"\0")))

    def remove_all_but(self, name: str) -> None:
        """Deletes everything below this path (a 'directory') but the object ``name`` directly below it. An object
        at this path itself is not below it: it is left alone (a user's, beside a step of ckpt's)."""
        store = self._store()
        prefix = self._prefix_range()
        kept = f"{self.key}/{name}".encode() if self.key else name.encode()
        self._wait(store.delete_range(ts.KvStore.KeyRange(prefix.inclusive_min, kept)))
        self._wait(store.delete_range(ts.KvStore.KeyRange(kept + b"\0", prefix.exclusive_max)))

    def remove_tree(self, *, last: str) -> None:
        """Deletes everything below this path (a 'directory'); the object named ``last`` directly below it
        goes last, so that a crash midway leaves it (see :meth:`remove_all_but`)."""
        self.remove_all_but(last)
        (self / last).unlink()
