"""Artifact store: immutable version prefixes, manifest last, resume, checksums, against disk and real S3."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from kiln.errors import IntegrityError, KilnInputError, RegistryConfigError, RegistryError
from kiln.registry import s3 as s3_module
from kiln.registry.store import (
    FETCHED_MANIFEST,
    Manifest,
    TransferEvent,
    download_version,
    list_version_keys,
    open_store,
    read_manifest,
    upload_version,
    verify_dir,
)

KEY = "ab" * 32
ENGINE = {
    "format_version": 1,
    "backend": "torch",
    "target": "t",
    "device": "cpu",
    "dtype": "float32",
    "limits": {},
    "toolchain": {"torch": "2.0.0"},
    "program": {"compile": "none", "cuda_graphs": False},
    "model": {},
    "layout": [],
}
"""The engine record a version carries (kiln-engine.json); the store only keeps it."""


def make_engine_dir(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """An engine-shaped dir of random bytes (the store is content-agnostic)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(seed)
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    (root / "kiln-engine.json").write_text('{"backend": "torch", "device": "cpu"}')
    return root


def _upload(store, engine: Path, events: list[TransferEvent] | None = None, on_progress=None):
    return upload_version(
        store.child(f"m/t/{KEY}"),
        engine,
        model="m",
        target="t",
        recipe="r",
        build_key=KEY,
        engine=ENGINE,
        lineage={"model_sha": "abc"},
        on_progress=events.append if events is not None else on_progress,
    )


class Interrupt(Exception):
    pass


def _interrupt_after(n: int):
    def hook(event: TransferEvent) -> None:
        if event.files_done == n:
            raise Interrupt

    return hook


def test_local_store_round_trip_writes_manifest_last_and_verifies(tmp_path: Path) -> None:
    engine = make_engine_dir(tmp_path / "engine", {"rank0.safetensors": 300_000, "sub/config.json": 100})
    store = open_store((tmp_path / "store").as_uri())
    manifest, created = _upload(store, engine)
    assert created and {e.path for e in manifest.files} == {
        "kiln-engine.json",
        "rank0.safetensors",
        "sub/config.json",
    }
    entry = next(e for e in manifest.files if e.path == "rank0.safetensors")
    assert entry.sha256 == hashlib.sha256((engine / "rank0.safetensors").read_bytes()).hexdigest()
    assert list_version_keys(store, "m", "t") == [KEY]

    out = download_version(store.child(f"m/t/{KEY}"), tmp_path / "out", manifest)
    assert (out / "sub/config.json").read_bytes() == (engine / "sub/config.json").read_bytes()
    assert verify_dir(out).build_key == KEY
    (out / "rank0.safetensors").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="rank0.safetensors"):
        verify_dir(out)


def test_interrupted_upload_is_not_a_version_and_resumes_skipping_uploaded_files(tmp_path: Path) -> None:
    engine = make_engine_dir(tmp_path / "engine", {"a.bin": 1000, "b.bin": 2000, "c.bin": 3000})
    store = open_store((tmp_path / "store").as_uri())
    with pytest.raises(Interrupt):
        _upload(store, engine, on_progress=_interrupt_after(2))
    version = store.child(f"m/t/{KEY}")
    assert version.stat("files/a.bin") is not None  # something was uploaded ...
    assert read_manifest(version) is None and list_version_keys(store, "m", "t") == []  # ... but no version

    events: list[TransferEvent] = []
    manifest, created = _upload(store, engine, events)
    assert created and [e.skipped for e in events] == [True, True, False, False]
    assert list_version_keys(store, "m", "t") == [KEY]

    again: list[TransferEvent] = []
    second, created = _upload(store, engine, again)
    assert not created and again == [] and second == manifest  # immutable: the first manifest wins


def test_manifest_conditional_put_lets_one_writer_win(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    assert store.put_bytes_if_absent("x/manifest.json", b"first")
    assert not store.put_bytes_if_absent("x/manifest.json", b"second")
    assert store.get_bytes("x/manifest.json") == b"first"


def test_tampered_file_fails_download_and_leaves_output_untouched(tmp_path: Path) -> None:
    engine = make_engine_dir(tmp_path / "engine", {"a.bin": 5000, "b.bin": 5000})
    store = open_store((tmp_path / "store").as_uri())
    manifest, _ = _upload(store, engine)
    stored = tmp_path / "store" / "m" / "t" / KEY / "files" / "b.bin"
    data = stored.read_bytes()
    stored.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # one flipped byte, same size
    with pytest.raises(IntegrityError, match="b.bin: checksum mismatch"):
        download_version(store.child(f"m/t/{KEY}"), tmp_path / "out", manifest)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # staging cleaned up


def test_manifest_with_unsafe_path_is_refused(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    bad = Manifest(
        model="m",
        target="t",
        recipe="r",
        build_key=KEY,
        created_at="now",
        engine=ENGINE,
        lineage={},
        files=[{"path": "../escape.txt", "size": 1, "sha256": "0" * 64}],
    )
    with pytest.raises(IntegrityError, match="unsafe path"):
        download_version(store, tmp_path / "out", bad)


def test_bad_store_uris_and_dirs_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(RegistryConfigError, match="unsupported scheme"):
        open_store("gs://bucket/x")
    with pytest.raises(RegistryConfigError, match="not a valid bucket name"):
        open_store("s3://Bad_Bucket/x")
    with pytest.raises(RegistryConfigError, match="absolute path"):
        open_store("file://relative/dir")
    store = open_store((tmp_path / "store").as_uri())
    with pytest.raises(KilnInputError, match="does not exist"):
        _upload(store, tmp_path / "missing")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(KilnInputError, match="not empty"):
        empty = Manifest(
            model="m",
            target="t",
            recipe="r",
            build_key=KEY,
            created_at="now",
            engine=ENGINE,
            lineage={},
            files=[],
        )
        download_version(store, tmp_path / "out", empty)


# --- real S3: SeaweedFS (verifies checksums, enforces signatures and If-None-Match) -----------------------


@pytest.mark.servers
def test_s3_multipart_upload_resume_and_download_verified(
    s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's minimum part size
    bucket = s3_env.make_bucket()
    engine = make_engine_dir(tmp_path / "engine", {"rank0.safetensors": 12 * 1024 * 1024, "config.json": 500})
    store = open_store(f"s3://{bucket}/engines")
    store.check_writable()
    with pytest.raises(Interrupt):
        _upload(store, engine, on_progress=_interrupt_after(2))
    assert list_version_keys(store, "m", "t") == []
    events: list[TransferEvent] = []
    manifest, created = _upload(store, engine, events)
    assert created and [e.skipped for e in events] == [True, True, False]
    assert list_version_keys(store, "m", "t") == [KEY]

    head = s3_env.client().head_object(
        Bucket=bucket, Key=f"engines/m/t/{KEY}/files/rank0.safetensors", ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"].endswith("-3")  # 3 parts, each SHA-256 verified by the server
    out = download_version(store.child(f"m/t/{KEY}"), tmp_path / "out", manifest)
    assert (out / "rank0.safetensors").read_bytes() == (engine / "rank0.safetensors").read_bytes()
    assert (out / FETCHED_MANIFEST).is_file()


@pytest.mark.servers
def test_s3_server_rejects_wrong_checksum_and_second_manifest(s3_env, tmp_path: Path) -> None:
    store = open_store(f"s3://{s3_env.make_bucket()}")
    payload = tmp_path / "f.bin"
    payload.write_bytes(os.urandom(1000))
    with pytest.raises(RegistryError, match="BadDigest"):
        store.put_file(payload, "f.bin", size=1000, sha256="00" * 32)
    assert store.stat("f.bin") is None
    assert store.put_bytes_if_absent("v/manifest.json", b"one")
    assert not store.put_bytes_if_absent("v/manifest.json", b"two")
    assert store.get_bytes("v/manifest.json") == b"one"


@pytest.mark.servers
def test_s3_tampered_object_fails_download(s3_env, tmp_path: Path) -> None:
    bucket = s3_env.make_bucket()
    engine = make_engine_dir(tmp_path / "engine", {"a.bin": 4000})
    store = open_store(f"s3://{bucket}")
    manifest, _ = _upload(store, engine)
    s3_env.client().put_object(Bucket=bucket, Key=f"m/t/{KEY}/files/a.bin", Body=b"tampered")
    with pytest.raises(IntegrityError, match="a.bin: checksum mismatch"):
        download_version(store.child(f"m/t/{KEY}"), tmp_path / "out", manifest)
    assert not (tmp_path / "out").exists()


@pytest.mark.servers
def test_s3_missing_bucket_bad_secret_and_dead_endpoint_are_clear(
    s3_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RegistryConfigError, match="bucket 'kiln-no-such-bucket' does not exist"):
        open_store("s3://kiln-no-such-bucket/x").check_writable()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(RegistryConfigError, match="no permission"):
        open_store(f"s3://{s3_env.make_bucket()}/x").check_writable()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{dead}")
    with pytest.raises(RegistryError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{dead}"):
        open_store("s3://some-bucket/x").check_writable()


@pytest.mark.servers
def test_moto_fixture_serves_a_round_trip(moto_s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = moto_s3.make_bucket()
    engine = make_engine_dir(tmp_path / "engine", {"a.bin": 2000})
    store = open_store(f"s3://{bucket}/p")
    manifest, created = _upload(store, engine)
    assert created and not _upload(store, engine)[1]
    out = download_version(store.child(f"m/t/{KEY}"), tmp_path / "out", manifest)
    assert (out / "a.bin").read_bytes() == (engine / "a.bin").read_bytes()
