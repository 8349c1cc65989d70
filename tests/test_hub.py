"""kiln.hub against a local hub endpoint driven by the real huggingface_hub client (no mocks)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from safetensors import safe_open

from kiln.errors import IntegrityError, ModelSourceError
from kiln.hub import SUPPORTED_ARCHITECTURES, fetch_model, hash_directory, inspect_model, load_tokenizer
from kiln.profiles import HubModel, LocalModel
from tests.fixtures.hub import LocalHub, model_repo_files, pickle_bytes
from tests.fixtures.models import make_tiny_llama

REPO = "kiln-test/tiny-llama"
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}
FAKE_TOKEN = "hf_kilnFakeToken0123456789secret"


@pytest.fixture(scope="module")
def repo_files(tiny_hub_model_dir: Path) -> dict[str, bytes]:
    files = model_repo_files(tiny_hub_model_dir, tiny_hub_model_dir)
    files["pytorch_model.bin"] = pickle_bytes(tiny_hub_model_dir)
    return files


def _files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def test_branch_resolves_to_commit_and_only_allowed_files_are_downloaded(
    local_hub: LocalHub, repo_files, kiln_home
):
    sha = local_hub.create_repo(REPO, repo_files)

    snapshot = fetch_model(HubModel(repo_id=REPO, revision="main"))

    assert (snapshot.sha, snapshot.source, snapshot.repo_id, snapshot.revision) == (sha, "hub", REPO, "main")
    assert snapshot.path.name == sha and snapshot.path.is_relative_to(kiln_home / "hf")
    assert _files_under(snapshot.path) == EXPECTED_FILES
    # README, .gitattributes and the pickle never left the hub
    assert local_hub.downloaded(REPO) == EXPECTED_FILES
    assert (snapshot.path / "model.safetensors").read_bytes() == repo_files["model.safetensors"]


def test_tag_and_commit_sha_pin_the_same_snapshot(local_hub: LocalHub, repo_files):
    sha = local_hub.create_repo(REPO, repo_files)
    local_hub.tag(REPO, "v1.0")

    by_tag = fetch_model(HubModel(repo_id=REPO, revision="v1.0"))
    by_sha = fetch_model(HubModel(repo_id=REPO, revision=sha))

    assert by_tag.sha == by_sha.sha == sha
    assert by_tag.path == by_sha.path


def test_moving_branch_gives_new_sha_and_new_snapshot(local_hub: LocalHub, repo_files, tmp_path):
    first_sha = local_hub.create_repo(REPO, repo_files)
    first = fetch_model(HubModel(repo_id=REPO))
    retrained = make_tiny_llama(tmp_path / "v2", seed=1, vocab=49152, hidden=32, tie=True)
    new_weights = (retrained / "model.safetensors").read_bytes()
    second_sha = local_hub.push(REPO, {"model.safetensors": new_weights})

    second = fetch_model(HubModel(repo_id=REPO))

    assert second_sha != first_sha
    assert (first.sha, second.sha) == (first_sha, second_sha)
    assert second.path != first.path
    assert (second.path / "model.safetensors").read_bytes() == new_weights
    assert (first.path / "model.safetensors").read_bytes() == repo_files["model.safetensors"]
    # The pinned old commit stays reachable by sha after the branch moved.
    assert fetch_model(HubModel(repo_id=REPO, revision=first_sha)).path == first.path


def test_offline_mode_uses_the_cached_snapshot_without_any_request(
    local_hub: LocalHub, repo_files, monkeypatch
):
    local_hub.create_repo(REPO, repo_files)
    online = fetch_model(HubModel(repo_id=REPO))
    local_hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    offline = fetch_model(HubModel(repo_id=REPO))

    assert (offline.sha, offline.path) == (online.sha, online.path)
    assert local_hub.requests == []
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        fetch_model(HubModel(repo_id="kiln-test/never-fetched"))


def test_offline_mode_from_the_environment_of_a_fresh_process(local_hub: LocalHub, repo_files, kiln_home):
    # HF_HUB_OFFLINE set before huggingface_hub is imported, as a user's shell would: no request reaches the
    # hub.
    sha = local_hub.create_repo(REPO, repo_files)
    fetch_model(HubModel(repo_id=REPO))
    local_hub.requests.clear()
    code = (
        "from kiln.hub import fetch_model; from kiln.profiles import HubModel; "
        f"print(fetch_model(HubModel(repo_id={REPO!r})).sha)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == sha
    assert local_hub.requests == []


def test_pickle_only_repo_is_refused_before_any_download(local_hub: LocalHub, repo_files):
    files = {k: v for k, v in repo_files.items() if k != "model.safetensors"}
    local_hub.create_repo("kiln-test/pickle-only", files)

    with pytest.raises(ModelSourceError, match=r"only pickle weights \(pytorch_model.bin\)"):
        fetch_model(HubModel(repo_id="kiln-test/pickle-only"))
    with pytest.raises(ModelSourceError, match="only pickle weights"):
        fetch_model(HubModel(repo_id="kiln-test/pickle-only", allow_patterns=["*.bin"], allow_pickle=True))
    assert local_hub.downloaded("kiln-test/pickle-only") == set()


def test_pickle_patterns_need_allow_pickle(local_hub: LocalHub, repo_files):
    local_hub.create_repo(REPO, repo_files)

    with pytest.raises(ModelSourceError, match=r"pickle files \['pytorch_model.bin'\].*allow_pickle: true"):
        fetch_model(HubModel(repo_id=REPO, allow_patterns=["*.bin"]))
    assert local_hub.downloaded(REPO) == set()

    snapshot = fetch_model(HubModel(repo_id=REPO, allow_patterns=["*.bin"], allow_pickle=True))
    assert _files_under(snapshot.path) == EXPECTED_FILES | {"pytorch_model.bin"}


def test_repo_without_safetensors_is_refused(local_hub: LocalHub, repo_files):
    files = {k: v for k, v in repo_files.items() if not k.endswith((".safetensors", ".bin"))}
    files["consolidated.safetensors"] = repo_files["model.safetensors"]
    local_hub.create_repo("kiln-test/no-weights", files)

    with pytest.raises(ModelSourceError, match=r"no safetensors weights.*consolidated.safetensors"):
        fetch_model(HubModel(repo_id="kiln-test/no-weights"))
    assert local_hub.downloaded("kiln-test/no-weights") == set()


def test_unknown_repo_and_revision_are_clear_errors(local_hub: LocalHub, repo_files):
    local_hub.create_repo(REPO, repo_files)

    with pytest.raises(ModelSourceError, match=r"model.repo_id: hub repo 'kiln-test/nope' .* does not exist"):
        fetch_model(HubModel(repo_id="kiln-test/nope"))
    with pytest.raises(ModelSourceError, match=r"model.revision: 'release-9' is not a branch, tag or commit"):
        fetch_model(HubModel(repo_id=REPO, revision="release-9"))
    with pytest.raises(ModelSourceError, match="is not a branch, tag or commit"):
        fetch_model(HubModel(repo_id=REPO, revision="0" * 40))
    assert local_hub.downloaded(REPO) == set()


def test_unsupported_architecture_is_refused_before_the_weights(local_hub: LocalHub, repo_files):
    config = json.loads(repo_files["config.json"])
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    local_hub.create_repo("kiln-test/gpt2", {**repo_files, "config.json": json.dumps(config).encode()})

    with pytest.raises(ModelSourceError, match=r"'GPT2LMHeadModel'.*LlamaForCausalLM, MistralForCausalLM"):
        fetch_model(HubModel(repo_id="kiln-test/gpt2"))
    assert local_hub.downloaded("kiln-test/gpt2") == {"config.json"}


def test_tampered_download_fails_the_checksum(local_hub: LocalHub, repo_files):
    local_hub.create_repo(REPO, repo_files)
    good = repo_files["model.safetensors"]
    local_hub.tamper(REPO, "model.safetensors", good[:-1] + bytes([good[-1] ^ 0xFF]))

    with pytest.raises(IntegrityError, match="model.safetensors"):
        fetch_model(HubModel(repo_id=REPO))
    local_hub.tampered.clear()  # the bad bytes were dropped: a retry downloads them again
    snapshot = fetch_model(HubModel(repo_id=REPO))
    assert (snapshot.path / "model.safetensors").read_bytes() == good


def test_token_reaches_the_hub_but_never_logs_or_errors(
    local_hub: LocalHub, repo_files, monkeypatch, caplog, capsys
):
    local_hub.create_repo("kiln-test/private", repo_files, token=FAKE_TOKEN)
    hub_logger = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hub_logger, "level", logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    texts = []

    with pytest.raises(ModelSourceError, match="HF_TOKEN") as anonymous:
        fetch_model(HubModel(repo_id="kiln-test/private"))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN[::-1])
    with pytest.raises(ModelSourceError) as wrong:
        fetch_model(HubModel(repo_id="kiln-test/private"))
    texts += ["".join(traceback.format_exception(e.value)) for e in (anonymous, wrong)]
    monkeypatch.delenv("HF_TOKEN")

    snapshot = fetch_model(HubModel(repo_id="kiln-test/private"), token=FAKE_TOKEN)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    from_env = fetch_model(HubModel(repo_id="kiln-test/private"))

    assert from_env.sha == snapshot.sha and _files_under(snapshot.path) == EXPECTED_FILES
    assert f"Bearer {FAKE_TOKEN}" in {r.authorization for r in local_hub.requests}
    captured = capsys.readouterr()
    texts += [caplog.text, captured.out, captured.err, repr(snapshot), json.dumps(snapshot.lineage())]
    assert any("kiln-test/private" in text for text in texts)  # the logs were captured at all
    for text in texts:
        assert FAKE_TOKEN not in text and FAKE_TOKEN[::-1] not in text


# --- local directories ------------------------------------------------------------------------------------


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_local_dir_hash_is_stable_and_content_sensitive(tiny_hub_model_dir: Path, tmp_path: Path):
    a = _copy_model(tiny_hub_model_dir, tmp_path / "a")
    b = _copy_model(tiny_hub_model_dir, tmp_path / "elsewhere" / "b")
    (b / ".cache").mkdir()
    (b / ".cache" / "lock").write_text("tool metadata")
    (b / ".DS_Store").write_bytes(b"\0")

    snap_a = fetch_model(LocalModel(local_dir=a))
    assert snap_a.source == "local" and snap_a.path == a.resolve() and len(snap_a.sha) == 64
    assert fetch_model(LocalModel(local_dir=b)).sha == snap_a.sha == hash_directory(a)

    config = json.loads((b / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (b / "config.json").write_text(json.dumps(config))
    assert fetch_model(LocalModel(local_dir=b)).sha != snap_a.sha

    (a / "generation_config.json").rename(a / "generation_config2.json")
    assert hash_directory(a) != snap_a.sha


def test_local_dir_pickles_and_missing_weights_are_refused(tiny_hub_model_dir: Path, tmp_path: Path):
    model_dir = _copy_model(tiny_hub_model_dir, tmp_path / "m")
    (model_dir / "training_args.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelSourceError, match=r"training_args.bin.*allow_pickle: true"):
        fetch_model(LocalModel(local_dir=model_dir))
    assert fetch_model(LocalModel(local_dir=model_dir, allow_pickle=True)).source == "local"

    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match=r"only pickle weights \(training_args.bin\)"):
        fetch_model(LocalModel(local_dir=model_dir, allow_pickle=True))
    (model_dir / "training_args.bin").unlink()
    with pytest.raises(ModelSourceError, match="no safetensors weights"):
        fetch_model(LocalModel(local_dir=model_dir))
    with pytest.raises(ModelSourceError, match="is not a directory"):
        fetch_model(LocalModel(local_dir=tmp_path / "missing"))


# --- inspection -------------------------------------------------------------------------------------------


def test_inspect_model_reads_shapes_from_headers(tmp_path: Path):
    path = make_tiny_llama(
        tmp_path / "m",
        hidden=64,
        layers=3,
        heads=4,
        kv_heads=2,
        intermediate=96,
        vocab=300,
        attention_bias=True,
    )
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        expected_params = sum(handle.get_tensor(name).numel() for name in handle.keys())

    info = inspect_model(path)

    assert (info.architecture, info.model_type, info.num_layers, info.hidden_size) == (
        "LlamaForCausalLM",
        "llama",
        3,
        64,
    )
    assert (info.num_heads, info.num_kv_heads, info.head_dim, info.intermediate_size) == (4, 2, 16, 96)
    assert (info.vocab_size, info.torch_dtype, info.tie_word_embeddings, info.attention_bias) == (
        300,
        "bfloat16",
        False,
        True,
    )
    assert info.param_count == expected_params
    assert inspect_model(make_tiny_llama(tmp_path / "nobias")).attention_bias is False


def test_inspect_model_on_smollm2_counts_tied_parameters_once(smollm2_dir: Path):
    info = inspect_model(smollm2_dir)
    assert (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads) == (30, 576, 9, 3)
    assert info.tie_word_embeddings is True
    assert round(info.param_count / 1e6, 1) == 134.5


def test_inspect_model_refuses_unsupported_and_corrupt(tmp_path: Path):
    path = make_tiny_llama(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["DbrxForCausalLM"]}))
    with pytest.raises(ModelSourceError) as excinfo:
        inspect_model(path)
    assert "DbrxForCausalLM" in str(excinfo.value)
    assert all(name in str(excinfo.value) for name in SUPPORTED_ARCHITECTURES)

    (path / "config.json").write_text(json.dumps(config))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4] + b"\xff" * 40)
    with pytest.raises(ModelSourceError, match="not a valid safetensors file"):
        inspect_model(path)


def test_load_tokenizer_from_a_fetched_snapshot(local_hub: LocalHub, repo_files, tmp_path):
    local_hub.create_repo(REPO, repo_files)
    tokenizer = load_tokenizer(fetch_model(HubModel(repo_id=REPO)))
    ids = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Once upon a time" and len(ids) >= 3
    with pytest.raises(ModelSourceError, match="no usable tokenizer"):
        load_tokenizer(make_tiny_llama(tmp_path / "no-tokenizer"))


def test_inspect_model_refuses_a_config_that_disagrees_with_its_weights(tmp_path: Path) -> None:
    """intermediate_size 256 in config.json with 128-row tensors: refused naming the first mismatching tensor,
    before transformers' loader would crash inside quantization."""
    path = make_tiny_llama(tmp_path / "m", intermediate=128)
    inspect_model(path)  # the honest config passes
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(
        ModelSourceError,
        match=r"model\.layers\.0\.mlp\.gate_proj\.weight is \[128, 64\].*intermediate_size 256",
    ):
        inspect_model(path)
