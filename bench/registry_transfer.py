"""Registry throughput to a local S3 server: upload/download of an engine dir, checksum overhead, publish
time.

    .venv/bin/python bench/registry_transfer.py [--size-mb 1024] [--files 4]

Starts SeaweedFS (`weed mini`) and `mlflow server` on 127.0.0.1 (the test fixtures' launchers), writes an
engine-shaped dir of random bytes (``--files`` large safetensors + a small config and engine record) and
measures, each on a fresh version prefix:

- sha256 of every file (what kiln adds before uploading and after downloading), page cache warm;
- plain boto3 ``upload_file`` / ``download_file`` with no checksums (the baseline);
- kiln ``upload_version`` (sha256, multipart with per-part SHA-256 the server verifies, manifest last) and
  ``download_version`` (download + whole-file sha256 verify + rename into place);
- the same upload again (manifest there: a no-op) and a resumed one (files there, manifest gone: HEAD +
  local hash per file, then the manifest);
- ``publish`` end to end (store + MLflow run + model version + ``candidate``) = build end to version visible,
  and the same publish with the files already uploaded (registration alone).

Writes ``bench/results/registry_transfer.{json,md}`` and prints the markdown table. Both servers and the
client share this machine's cores and disk, so the numbers are a floor for a real S3 over a network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.servers import launch_mlflow, launch_seaweedfs  # noqa: E402

MB = 1024 * 1024


def make_engine(root: Path, size_mb: int, files: int) -> Path:
    root.mkdir(parents=True)
    per_file = size_mb * MB // files
    block = os.urandom(16 * MB)
    for index in range(files):
        with (root / f"rank{index}.safetensors").open("wb") as out:
            left = per_file
            while left > 0:
                # Vary each block so neither dedup nor compression can help the server.
                chunk = os.urandom(64) + block[64 : min(left, len(block))]
                out.write(chunk)
                left -= len(chunk)
    (root / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM", "dtype": "bfloat16"}))
    import torch

    (root / "kiln-engine.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "backend": "torch",
                "target": "cpu",
                "device": "cpu",
                "sm": None,
                "dtype": "bfloat16",
                "limits": {},
                "toolchain": {"torch": torch.__version__},
                "program": {"compile": "none", "cuda_graphs": False},
                "model": {},
                "layout": [],
            }
        )
    )
    return root


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-registry-"))
    s3 = launch_seaweedfs(work / "seaweedfs")
    mlflow = None
    try:
        os.environ.update(s3.env)
        os.environ.pop("AWS_ENDPOINT_URL", None)
        os.environ["KILN_HOME"] = str(work / "home")
        from kiln.engine.manifest import read
        from kiln.profiles import Registry
        from kiln.registry import publish
        from kiln.registry import s3 as s3_module
        from kiln.registry.store import download_version, open_store, scan_dir, sha256_file, upload_version

        engine = make_engine(work / "engine", args.size_mb, args.files)
        engine_record = read(engine)
        files = scan_dir(engine)
        total = sum(path.stat().st_size for _, path in files)
        total_mb = total / MB
        bucket = s3.make_bucket("bench")
        store = open_store(f"s3://{bucket}/engines")
        results: dict[str, dict[str, float]] = {}

        def record(name: str, seconds: float) -> None:
            results[name] = {"s": round(seconds, 2), "MB_per_s": round(total_mb / seconds, 1)}
            print(f"{name}: {seconds:.2f} s, {total_mb / seconds:.1f} MB/s", flush=True)

        for _, path in files:  # warm the page cache so the first measurement is not a disk read
            sha256_file(path)
        record("sha256 (all files)", timed(lambda: [sha256_file(p) for _, p in files])[0])

        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        plain = (
            __import__("boto3")
            .session.Session()
            .client(
                "s3",
                config=Config(
                    request_checksum_calculation="when_required", response_checksum_validation="when_required"
                ),
            )
        )
        config = TransferConfig(
            multipart_threshold=s3_module.MULTIPART_THRESHOLD,
            multipart_chunksize=s3_module.MULTIPART_THRESHOLD,
            max_concurrency=8,
        )

        def raw_upload() -> None:
            for rel, path in files:
                plain.upload_file(str(path), bucket, f"raw/{rel}", Config=config)

        record("boto3 upload, no checksums (baseline)", timed(raw_upload)[0])
        raw_dir = work / "raw-down"
        raw_dir.mkdir()

        def raw_download() -> None:
            for rel, _ in files:
                plain.download_file(bucket, f"raw/{rel}", str(raw_dir / rel), Config=config)

        record("boto3 download, no checksums (baseline)", timed(raw_download)[0])
        shutil.rmtree(raw_dir)

        key = "ab" * 32
        version = store.child(f"bench/cpu/{key}")
        up_s, (manifest, created) = timed(
            lambda: upload_version(
                version,
                engine,
                model="bench",
                target="cpu",
                recipe="fp8",
                build_key=key,
                engine=engine_record,
                lineage={},
            )
        )
        assert created
        record("kiln upload_version (sha256 + multipart SHA-256 + manifest)", up_s)
        again_s, (_, created_again) = timed(
            lambda: upload_version(
                version,
                engine,
                model="bench",
                target="cpu",
                recipe="fp8",
                build_key=key,
                engine=engine_record,
                lineage={},
            )
        )
        assert not created_again
        results["kiln upload of a published version (manifest there: no-op)"] = {"s": round(again_s, 3)}
        version.delete("manifest.json")  # the same files, no manifest: what a crashed publisher leaves
        record(
            "kiln resume after crash (no manifest: HEAD + sha256 per file, manifest put)",
            timed(
                lambda: upload_version(
                    version,
                    engine,
                    model="bench",
                    target="cpu",
                    recipe="fp8",
                    build_key=key,
                    engine=engine_record,
                    lineage={},
                )
            )[0],
        )
        down = work / "down"
        record(
            "kiln download_version (download + sha256 verify)",
            timed(lambda: download_version(version, down, manifest))[0],
        )
        shutil.rmtree(down)

        mlflow = launch_mlflow(work / "mlflow")
        registry = Registry(model_name="bench", tracking_uri=mlflow.url, store_uri=f"s3://{bucket}/published")

        def do_publish(build_key: str):
            return publish(
                engine,
                registry=registry,
                build_key=build_key,
                lineage={"model_sha": "0" * 40},
                metrics={"perplexity": 32.0},
                params={"recipe.name": "fp8"},
                artifacts=[],
                passed_gates=True,
                recommended=True,
                recipe="fp8",
                target="cpu",
            )

        do_publish("01" * 32)  # first call creates the experiment and the registered model
        publish_s, published = timed(lambda: do_publish("02" * 32))
        from mlflow import MlflowClient

        visible = MlflowClient(mlflow.url, mlflow.url).get_model_version_by_alias("bench.cpu", "candidate")
        assert str(visible.version) == str(published.version)
        record("publish end to end (build end -> version visible as candidate)", publish_s)
        # Registration alone (files already in the store: a rerun after a crash, or a build whose upload was
        # timed above): median of 3 on a small engine, as it does not depend on the engine's size.
        small = work / "small-engine"
        small.mkdir()
        shutil.copy(engine / "config.json", small)
        shutil.copy(engine / "kiln-engine.json", small)
        times = []
        for index in range(3):
            pre_key = f"{index + 3:02d}" * 32
            upload_version(
                open_store(registry.store_uri).child(f"bench/cpu/{pre_key}"),
                small,
                model="bench",
                target="cpu",
                recipe="fp8",
                build_key=pre_key,
                engine=engine_record,
                lineage={},
            )
            times.append(
                timed(
                    lambda key=pre_key: publish(
                        small,
                        registry=registry,
                        build_key=key,
                        lineage={"model_sha": "0" * 40},
                        metrics={"perplexity": 32.0},
                        params={"recipe.name": "fp8"},
                        artifacts=[],
                        passed_gates=True,
                        recommended=True,
                        recipe="fp8",
                        target="cpu",
                    )
                )[0]
            )
        results["publish, files already uploaded (MLflow registration only, median of 3)"] = {
            "s": round(sorted(times)[1], 2),
            "all_s": [round(t, 2) for t in times],
        }
        print(f"registration only: {[round(t, 2) for t in times]} s", flush=True)
        load = os.getloadavg()
    finally:
        if mlflow is not None:
            mlflow.process.stop()
        assert s3.process is not None
        s3.process.stop(grace_s=2.0)
        shutil.rmtree(work, ignore_errors=True)

    import boto3

    meta = {
        "size_mb": round(total_mb, 1),
        "files": len(files),
        "multipart_part_mb": s3_module.MULTIPART_THRESHOLD // MB,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "boto3": boto3.__version__,
        "loadavg_1m_at_end": round(load[0], 2),
        "server": "SeaweedFS weed mini on 127.0.0.1 (same machine)",
        "mlflow": "mlflow server, SQLite backend",
        "command": f".venv/bin/python bench/registry_transfer.py --size-mb {args.size_mb} --files "
        f"{args.files}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registry_transfer.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1) + "\n"
    )
    raw_up = results["boto3 upload, no checksums (baseline)"]["s"]
    raw_down = results["boto3 download, no checksums (baseline)"]["s"]
    lines = [
        f"# Registry transfer: {meta['size_mb']:.0f} MB engine dir ({len(files)} files) to local SeaweedFS",
        "",
        f"Command: `{meta['command']}` ({meta['cpus']} CPUs shared by client and servers; "
        f"multipart parts of {meta['multipart_part_mb']} MB; 1-min load average at the end "
        f"{meta['loadavg_1m_at_end']}: the machine is shared, so single samples are noisy).",
        "",
        "| measurement | time | throughput |",
        "| --- | --- | --- |",
    ]
    for name, row in results.items():
        rate = f"{row['MB_per_s']} MB/s" if "MB_per_s" in row else ""
        lines.append(f"| {name} | {row['s']} s | {rate} |")
    up = results["kiln upload_version (sha256 + multipart SHA-256 + manifest)"]["s"]
    down_k = results["kiln download_version (download + sha256 verify)"]["s"]
    lines += [
        "",
        f"Checksum overhead: upload {100 * (up / raw_up - 1):+.0f}% vs plain boto3, download "
        f"{100 * (down_k / raw_down - 1):+.0f}% (sha256 alone: "
        f"{results['sha256 (all files)']['MB_per_s']} MB/s on one core).",
    ]
    (args.out / "registry_transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
