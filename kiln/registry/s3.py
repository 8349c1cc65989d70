"""``s3://bucket/prefix`` store through boto3 (AWS S3 or any S3-compatible server).

The endpoint comes from boto3's own configuration: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, the
AWS config file, or AWS itself; credentials likewise. Integrity, in layers: a single-part upload carries
the file's full SHA-256 (``ChecksumSHA256``), which the server verifies; a multipart upload carries a
SHA-256 per part (the server verifies each and stores a composite checksum); every object also keeps
kiln's whole-file sha256 in its metadata for resume, and the manifest's sha256 is re-checked on download.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kiln.errors import IntegrityError, RegistryConfigError, RegistryError
from kiln.registry.store import ObjectStat, Store

MULTIPART_THRESHOLD = 64 * 1024 * 1024
"""Files at least this large go up as multipart uploads of this part size (parallel parts, resumable size)."""
_META_SHA256 = "kiln-sha256"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "Forbidden",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}
_MISSING_BUCKET = {"NoSuchBucket"}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _client() -> Any:
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=120, retries={"max_attempts": 4, "mode": "standard"})
    # A fresh session per store: boto3's default session caches credentials and endpoint at first use.
    return boto3.session.Session().client("s3", config=config)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_THRESHOLD,
        max_concurrency=8,
        use_threads=True,
    )


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or _client()
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @classmethod
    def from_uri(cls, uri: str) -> S3Store:
        parsed = urlparse(uri)
        if not _BUCKET_RE.match(parsed.netloc) or ".." in parsed.netloc:
            raise RegistryConfigError(
                f"store URI {uri!r}: {parsed.netloc!r} is not a valid bucket name "
                "(3-63 lowercase letters, digits, '.', '-'); use s3://BUCKET/PREFIX"
            )
        return cls(parsed.netloc, parsed.path)

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, f"{self.prefix}/{prefix}" if self.prefix else prefix, self.client)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        """Turn botocore failures into kiln errors that name the bucket, endpoint and what to do."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            EndpointConnectionError,
            FlexibleChecksumError,
            NoCredentialsError,
        )

        where = f"s3://{self.bucket}/{self._key(key)}" if key else self.uri
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            if code in _MISSING_BUCKET:
                raise self._missing_bucket() from None
            if code in _AUTH_CODES:
                raise RegistryConfigError(
                    f"{where}: {action} refused ({code}) by {self.endpoint}: no permission. Check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy"
                ) from None
            raise RegistryError(
                f"{where}: {action} failed at {self.endpoint}: {code} "
                f"{exc.response.get('Error', {}).get('Message', '')}",
                where=where,
                code=code,
            ) from None
        except NoCredentialsError:
            raise RegistryConfigError(
                f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from None
        except (EndpointConnectionError, ConnectionError) as exc:
            raise RegistryError(
                f"{where}: cannot reach the S3 endpoint {self.endpoint} ({type(exc).__name__}); "
                "check that the server is up and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL",
                where=where,
                retryable=True,
            ) from None
        except FlexibleChecksumError as exc:
            raise IntegrityError(
                f"{where}: the server's checksum does not match the bytes received ({exc})"
            ) from None
        except BotoCoreError as exc:
            raise RegistryError(f"{where}: {action} failed at {self.endpoint}: {exc}", where=where) from None

    def _missing_bucket(self) -> RegistryConfigError:
        return RegistryConfigError(
            f"{self.uri}: bucket {self.bucket!r} does not exist at {self.endpoint}; "
            "create it (aws s3 mb s3://BUCKET) or fix store_uri / KILN_STORE_URI"
        )

    def check_root(self) -> None:
        """HEAD the bucket: some servers (SeaweedFS) create a bucket on first put, hiding a typo."""
        from botocore.exceptions import ClientError

        with self._errors("HEAD bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _code(exc) in _MISSING_KEY | _MISSING_BUCKET:
                    raise self._missing_bucket() from None
                raise

    def check_writable(self) -> None:
        self.check_root()
        key = f".kiln-probe/{uuid.uuid4().hex}"
        with self._errors("probe write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=b"kiln")
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        if body != b"kiln":
            raise RegistryError(f"{self.uri}: a probe object read back different bytes")

    def stat(self, key: str) -> ObjectStat | None:
        from botocore.exceptions import ClientError

        with self._errors("HEAD", key):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
            except ClientError as exc:
                if _code(exc) in _MISSING_KEY:
                    return None
                raise
        sha = head.get("Metadata", {}).get(_META_SHA256)
        server = head.get("ChecksumSHA256")
        if server and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" and "-" not in server:
            sha = base64.b64decode(server).hex()  # what the server verified beats what we wrote
        return ObjectStat(size=int(head["ContentLength"]), sha256=sha)

    def put_file(self, local: Path, key: str, *, size: int, sha256: str) -> None:
        meta = {_META_SHA256: sha256}
        with self._errors("upload", key):
            if size < MULTIPART_THRESHOLD:
                with local.open("rb") as body:
                    self.client.put_object(
                        Bucket=self.bucket,
                        Key=self._key(key),
                        Body=body,
                        ChecksumSHA256=_b64(sha256),
                        Metadata=meta,
                    )
            else:
                self.client.upload_file(
                    str(local),
                    self.bucket,
                    self._key(key),
                    Config=_transfer_config(),
                    ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": meta},
                )

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._errors("conditional put", key):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=data,
                    IfNoneMatch="*",
                    ChecksumSHA256=_b64(hashlib.sha256(data).hexdigest()),
                )
            except ClientError as exc:
                if _code(exc) in _PRECONDITION:
                    return False
                raise
        return True

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors("GET", key):
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED"
                )
            except ClientError as exc:
                if _code(exc) in _MISSING_KEY:
                    return None
                raise
            return response["Body"].read()

    def get_file(self, key: str, local: Path) -> None:
        from botocore.exceptions import ClientError

        with self._errors("download", key):
            try:
                self.client.download_file(
                    self.bucket,
                    self._key(key),
                    str(local),
                    Config=_transfer_config(),
                    ExtraArgs={"ChecksumMode": "ENABLED"},
                )
            except ClientError as exc:
                if _code(exc) in _MISSING_KEY:
                    raise FileNotFoundError(key) from None
                raise

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._key(prefix).rstrip("/") + "/"
        names = []
        with self._errors("LIST", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/"
            ):
                names += [p["Prefix"][len(base) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)
