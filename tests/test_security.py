"""Security: no unsafe deserialisation or remote code in kiln's source; secrets never reach logs, CLI errors,
Prefect logs/artifacts (real Prefect harness) or MLflow
(tests/test_registry.py::test_overrides_lineage_...)."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("kiln", "flows", "tasks")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
FAKE_HF_TOKEN = "hf_FAKEfakeFAKE0123456789token"
FAKE_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEY"


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_uses(source: str, where: str) -> list[str]:
    """Every unsafe deserialisation / remote-code use in ``source`` (a Python module's text)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [
                f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            attr = func.attr if isinstance(func, ast.Attribute) else None
            owner = (
                func.value.id
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                else None
            )
            remote = _kw(node, "trust_remote_code")
            if remote is not None and not _is_const(remote, False):
                found.append(f"{line}: trust_remote_code not literally False")
            if owner == "torch" and attr == "load" and not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{line}: torch.load without weights_only=True")
            if owner == "yaml" and attr in {"load", "load_all", "unsafe_load", "full_load"}:
                loader = _kw(node, "Loader")
                if not (isinstance(loader, ast.Attribute) and loader.attr in {"SafeLoader", "CSafeLoader"}):
                    found.append(f"{line}: yaml.{attr} without SafeLoader (use yaml.safe_load)")
            archive_filter = _kw(node, "filter")
            if attr in {"extractall", "extract"} and not (
                isinstance(archive_filter, ast.Constant) and archive_filter.value == "data"
            ):
                # any archive extraction must refuse paths outside the target dir (tarfile filter="data")
                found.append(f"{line}: {attr}() without filter='data'")
            if isinstance(func, ast.Name) and func.id in {"eval", "exec"}:
                found.append(f"{line}: builtin {func.id}()")
    return found


def test_the_scanner_catches_each_unsafe_pattern() -> None:
    bad = "\n".join(
        [
            "import pickle",
            "from dill import loads",
            "torch.load(p)",
            "torch.load(p, weights_only=False)",
            "AutoModel.from_pretrained(p, trust_remote_code=True)",
            "f(trust_remote_code=flag)",
            "yaml.load(text)",
            "tarfile.open(p).extractall(d)",
            "eval('1')",
        ]
    )
    assert len(unsafe_uses(bad, "bad.py")) == 9
    good = (
        "torch.load(p, weights_only=True)\nAutoConfig.from_pretrained(p, trust_remote_code=False)\n"
        "yaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\nt.extractall(d, "
        "filter='data')\nmodel.eval()\n"
    )
    assert unsafe_uses(good, "good.py") == []


def test_source_tree_has_no_pickle_unsafe_torch_load_remote_code_or_unsafe_extraction() -> None:
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20  # the scan really covered the tree
    found = [u for p in files for u in unsafe_uses(p.read_text(), str(p.relative_to(REPO)))]
    assert found == []


@pytest.fixture
def fake_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS_SECRET)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_secret_values_and_url_passwords_are_masked_in_every_log_record(fake_secrets) -> None:
    import kiln  # noqa: F401  (installs the redaction)

    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        log = logging.getLogger("some.library")  # not kiln's: third-party loggers are covered too
        log.warning("hub answered with token %s", FAKE_HF_TOKEN)
        log.warning("endpoint https://ak:%s@s3.example/bucket", "pw-in-url-123")
        try:
            raise RuntimeError(f"signature for {FAKE_AWS_SECRET} rejected")
        except RuntimeError:
            log.exception("upload failed")
    finally:
        root.removeHandler(handler)
    text = "\n".join(handler.lines)
    assert "upload failed" in text and "RuntimeError" in text and text.count("***") == 3
    for secret in (FAKE_HF_TOKEN, FAKE_AWS_SECRET, "pw-in-url-123"):
        assert secret not in text


def test_cli_errors_mask_secrets(fake_secrets, capsys: pytest.CaptureFixture) -> None:
    import typer

    from kiln.commands._common import cli_errors
    from kiln.errors import RegistryError

    with pytest.raises(typer.Exit) as exit_info, cli_errors():
        raise RegistryError(f"s3 refused key {FAKE_AWS_SECRET} at https://u:hunter2pw@mlflow.example")
    err = capsys.readouterr().err
    assert exit_info.value.exit_code == 1 and "s3 refused key ***" in " ".join(err.split())
    assert FAKE_AWS_SECRET not in err and "hunter2pw" not in err


def test_prefect_logs_and_report_artifacts_mask_secrets(
    prefect_harness, fake_secrets, kiln_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real report task publishes its Prefect artifacts; a flow logs through Prefect's API log handler."""
    from uuid import UUID

    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from kiln.hub import ModelSnapshot as Snapshot
    from kiln.profiles import load_request
    from kiln.steps import Outcome
    from kiln.tasks.report import report

    monkeypatch.setenv("KILN_PROFILES_DIR", str(REPO / "profiles"))
    # the tracking host does not resolve: the report's MLflow logging fails (a masked warning) without
    # MLflow's minutes of default retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tracking = "https://kiln:tracking-pw-42@mlflow.example"
    request = load_request(
        {
            "name": "sec-report",
            "model": {"repo_id": "org/model", "revision": "main"},
            "recipes": ["none"],
            "targets": ["cpu"],
            "registry": {"model_name": "sec", "tracking_uri": tracking},
        }
    )
    snapshot = Snapshot(path=kiln_home, sha="a" * 40, source="hub", repo_id="org/model", revision="main")
    outcome = Outcome(
        recipe="none",
        target="cpu",
        status="registered",
        verdict="pass",
        metrics={"perplexity": 30.0},
        recommended=True,
        model_name="sec.cpu",
        version="1",
        uri=f"s3://engines/sec/cpu/k?X-Amz-Credential={FAKE_AWS_SECRET}",
        build_key="k" * 64,
    )

    @flow(name="kiln-security-probe")
    def probe() -> tuple[str, str]:
        from prefect.runtime import flow_run

        get_run_logger().warning("using HF token %s and %s", FAKE_HF_TOKEN, tracking)
        return report(request, snapshot, [outcome]), flow_run.id

    markdown, run_id = probe()
    assert "sec.cpu v1" in markdown
    APILogHandler().flush()  # logs ship in batches: send this run's before reading them back
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        # this run's logs only: the session's harness holds other tests' logs past the default page size
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])))
    texts = (
        [markdown] + [f"{a.key} {a.data} {a.description}" for a in artifacts] + [lg.message for lg in logs]
    )
    assert any("kiln-build-sec-report" in t for t in texts)  # the artifacts were really read back
    assert any("using HF token ***" in t for t in texts)  # and the log line
    for text in texts:
        for secret in (FAKE_HF_TOKEN, FAKE_AWS_SECRET, "tracking-pw-42"):
            assert secret not in text, text


def test_a_fetched_engine_is_verified_by_checksum_before_the_torch_backend_loads_it(
    kiln_home: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kiln.cli import app
    from kiln.profiles import Registry
    from kiln.registry import fetch
    from tests.test_registry import do_publish, key, make_engine

    do_publish(make_engine(tmp_path / "engine"), Registry(model_name="chk"), key(31))
    out = fetch("chk@candidate", "cpu", tmp_path / "fetched")
    weights = out / "rank0.safetensors"
    weights.write_bytes(b"\0" + weights.read_bytes()[1:])  # one byte flipped after the fetch
    # the loaders' callers check (kiln.registry.fetch.verify_if_fetched): the torch engine imports no registry
    for command in (["generate", str(out), "--prompt", "hi"], ["bench", str(out)]):
        refused = CliRunner().invoke(app, command, env={"COLUMNS": "1000"})
        assert refused.exit_code != 0
        assert re.search(r"rank0\.safetensors.*does not match its sha256", refused.output)


def test_masking_goes_by_what_is_a_secret_not_by_substrings() -> None:
    """``max_num_tokens`` is a build limit, not a credential; key-shaped values are masked under any name."""
    from kiln.redact import REDACTED, redact, scrub

    params = scrub(
        {
            "target.limits.max_num_tokens": 8192,
            "evaluation.heldout_tokens": 2048,
            "tokenizer_dir": "/m",
            "HF_TOKEN": "x" * 8,
            "lineage.aws_secret_access_key": "y" * 8,
            "db.password": "z" * 8,
            "registry.api_key": "k" * 8,
            "note": f"pushed with {FAKE_HF_TOKEN}",
            "author": "ana",
        }
    )
    assert params["target.limits.max_num_tokens"] == 8192 and params["evaluation.heldout_tokens"] == 2048
    assert params["tokenizer_dir"] == "/m" and params["author"] == "ana"
    assert all(
        params[k] == REDACTED
        for k in ("HF_TOKEN", "lineage.aws_secret_access_key", "db.password", "registry.api_key")
    )
    assert FAKE_HF_TOKEN not in params["note"] and REDACTED in params["note"]
    assert redact("key AKIAABCDEFGHIJKLMNOP used") == f"key {REDACTED} used"
    assert (
        redact("hf_quant_config.json and max_new_tokens stay")
        == "hf_quant_config.json and max_new_tokens stay"
    )
