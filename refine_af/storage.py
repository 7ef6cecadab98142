"""Read and write by URI — a local path or ``s3://bucket/key`` — with atomic writes.

Stages take URIs so the same code runs on a laptop (local folders) and on the cluster
(MinIO or any S3 endpoint). Every write is atomic: a reader sees the old content or the
new content, never a half-written file, so a crashed stage never leaves output that a
later stage would take as complete.
"""

import contextlib
import functools
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from refine_af.errors import InputError, InvalidURI, StorageUnavailable

S3_SCHEME = "s3://"
# botocore's "standard" retry mode: exponential backoff with jitter on throttling,
# 5xx and connection errors, which MinIO under load does return. Counts the first try.
# With the timeouts below, a silent endpoint fails one call in under a minute, not 5 × 60 s.
S3_MAX_ATTEMPTS = int(os.environ.get("REFINE_AF_S3_MAX_ATTEMPTS", "3"))
S3_CONNECT_TIMEOUT_S = float(os.environ.get("REFINE_AF_S3_CONNECT_TIMEOUT", "5"))
S3_READ_TIMEOUT_S = float(os.environ.get("REFINE_AF_S3_READ_TIMEOUT", "15"))
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
_CREDENTIAL_CODES = frozenset(
    {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
     "ExpiredToken", "Forbidden"}
)  # fmt: skip
_UNREACHABLE = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
)


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs; everything else is a local path."""
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty (a prefix).

    Checked up front so a typo (``s3:/b``, ``s3://B_ucket``) fails with the URI in the
    message instead of as an opaque botocore error later.
    """
    if not is_s3(uri):
        raise InvalidURI(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise InvalidURI(f"malformed S3 URI {uri!r}: {bucket!r} is not a valid bucket name")
    return bucket, key


def s3_client() -> BaseClient:
    """A boto3 S3 client for the endpoint in ``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``.

    No endpoint means AWS itself. Clients are thread-safe and costly to build, so one is
    kept per endpoint.
    """
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    return _client_for(endpoint)


@functools.cache
def _client_for(endpoint: str | None) -> BaseClient:
    # A custom endpoint (MinIO) has no wildcard DNS for bucket.host, hence path-style.
    config = Config(
        retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Name the URI in S3 failures: "no such key/bucket" becomes FileNotFoundError (as a
    local path would raise), refused or missing credentials an InputError, an endpoint that
    does not answer StorageUnavailable."""
    try:
        yield
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        if code in _MISSING_CODES:
            raise FileNotFoundError(f"no such S3 object or bucket: {uri}") from error
        if code in _CREDENTIAL_CODES:
            raise InputError(
                f"{uri}: S3 at {_endpoint()} refused the request ({code}); check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            ) from error
        raise
    except (NoCredentialsError, PartialCredentialsError) as error:
        raise InputError(
            f"{uri}: no S3 credentials ({error}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from error
    except _UNREACHABLE as error:
        raise StorageUnavailable(
            f"S3 endpoint {_endpoint()} did not answer for {uri} after {S3_MAX_ATTEMPTS} "
            f"attempts ({error}); check S3_ENDPOINT_URL and that the server is up"
        ) from error


def _s3_object(uri: str) -> tuple[str, str]:
    """``split_s3`` for calls that need an object, not a bucket or prefix."""
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise InvalidURI(f"S3 URI {uri!r} names a bucket or prefix, not an object")
    return bucket, key


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable: the new name survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    For libraries that write to a path themselves (torch, safetensors, save_pretrained).
    Nothing exists at the yielded path: the writer creates a file or a folder there. The
    temporary lives in the destination folder because a rename is only atomic within one
    filesystem. On error the temporary is removed and ``path`` is left untouched. A folder
    can only replace a missing or empty folder (POSIX rename).
    """
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        if temporary.is_file():
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
        os.replace(temporary, destination)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(destination.parent)


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole content at ``uri``; FileNotFoundError names the URI if it is missing."""
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = _s3_object(str(uri))
    with _s3_errors(str(uri)):
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def read_text(uri: str | os.PathLike[str]) -> str:
    """``read_bytes`` decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically, creating parent folders.

    Local: temp file in the same folder, fsync, ``os.replace``. S3: a single
    ``put_object``, which is atomic by nature — the object appears whole or not at all.
    """
    if is_s3(uri):
        bucket, key = _s3_object(str(uri))
        with _s3_errors(str(uri)):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    with atomic_path(uri) as temporary:
        temporary.write_bytes(data)


def write_text(uri: str | os.PathLike[str], text: str) -> None:
    """``write_bytes`` of ``text`` encoded as UTF-8."""
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str | os.PathLike[str]) -> bool:
    """True if a local file/folder or an S3 object exists at ``uri``."""
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = _s3_object(str(uri))
    try:
        with _s3_errors(str(uri)):
            s3_client().head_object(Bucket=bucket, Key=key)
    except FileNotFoundError:
        return False
    return True


def _s3_folder_prefix(key: str) -> str:
    """``a/b`` → ``a/b/`` so a folder prefix does not also match its sibling ``a/b2``."""
    return key if not key or key.endswith("/") else f"{key}/"


def _s3_keys(bucket: str, prefix: str, uri: str) -> Iterator[str]:
    """Every object key under ``prefix`` (the paginator follows continuation tokens)."""
    paginator = s3_client().get_paginator("list_objects_v2")
    with _s3_errors(uri):
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                if not entry["Key"].endswith("/"):  # skip folder markers some tools write
                    yield entry["Key"]


def _local_target(root: Path, relative_key: str, uri: str) -> Path:
    """Where an object goes under ``root``; refuses keys like ``../x`` that would escape it."""
    target = (root / relative_key).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ValueError(f"S3 key {relative_key!r} under {uri} escapes the download folder")
    return target


def download_dir(s3_uri: str, local_dir: str | os.PathLike[str]) -> Path:
    """Mirror every object under ``s3_uri`` into ``local_dir`` and return it.

    Downloads into a temporary folder beside ``local_dir`` and renames it into place, so a
    half download is never taken as a complete mirror. If ``local_dir`` exists by then
    (it existed already, or a concurrent download finished first) it is kept and this copy
    is discarded: a mirror never changes under a reader. An empty prefix raises
    FileNotFoundError, since there is nothing to mirror.
    """
    bucket, key = split_s3(s3_uri)
    prefix = _s3_folder_prefix(key)
    keys = list(_s3_keys(bucket, prefix, s3_uri))
    if not keys:
        raise FileNotFoundError(f"no objects under {s3_uri}")
    destination = Path(local_dir)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.tmp")
    try:
        for object_key in keys:
            target = _local_target(temporary, object_key.removeprefix(prefix), s3_uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            with _s3_errors(f"{S3_SCHEME}{bucket}/{object_key}"):
                s3_client().download_file(bucket, object_key, str(target))
        try:
            temporary.rename(destination)
        except OSError:
            if not destination.is_dir():  # anything but "a complete mirror is already there"
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return destination
