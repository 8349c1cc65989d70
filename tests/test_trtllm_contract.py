"""kiln's TensorRT-LLM knowledge vs the API contract files (kiln/contracts/tensorrt_llm-<series>.json).

Everything kiln emits (trtllm-build flags, LLM API arguments, KvCacheConfig and SamplingParams fields) or
reads (QuantAlgo values, hf_quant_config keys, engine config keys, result fields) must be in the contract of
the series it targets, and dropping any of them from a copy of the contract must make kiln refuse.
The checkpoints are real ModelOpt exports of a tiny Llama (CPU), not hand-written configs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from kiln.engine.base import SamplingParams
from kiln.engine.trtllm import api, backend
from kiln.errors import ContractError
from kiln.profiles import Target
from kiln.quantize import restore_rope_config
from kiln.recipes import KV_SCHEMES, SCHEMES
from tests.fixtures.models import make_tiny_llama

CONTRACTS = Path(api.__file__).resolve().parents[2] / "contracts"
H100 = Target(
    name="h100-trtllm",
    backend="tensorrt_llm",
    device="cuda",
    gpu="h100",
    sm="sm90",
    gpu_memory_gib=80,
    limits={"max_batch_size": 64, "max_input_len": 2048, "max_seq_len": 4096, "max_num_tokens": 8192},
    work_pool="kiln-h100-trtllm",
)
H100_HF = H100.model_copy(update={"name": "h100-trtllm-hf", "artifact": "hf_checkpoint"})


def export_checkpoint(
    out_dir: Path, quantization: str, *, fmt: str = "trtllm", model_dir: Path | None = None
) -> Path:
    """Calibrate a tiny random Llama with ModelOpt on CPU and export it (TensorRT-LLM or HF checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = model_dir or make_tiny_llama(out_dir.parent / f"{out_dir.name}-src")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg_name = SCHEMES[quantization].modelopt_cfg
    if cfg_name:
        import modelopt.torch.quantization as mtq

        ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        mtq.quantize(model, getattr(mtq, cfg_name), lambda m: m(ids))
    if fmt == "trtllm":
        from modelopt.torch.export import export_tensorrt_llm_checkpoint

        export_tensorrt_llm_checkpoint(
            model, decoder_type="llama", dtype=torch.bfloat16, export_dir=out_dir, inference_tensor_parallel=1
        )
        # as kiln.quantize does (ModelOpt drops rotary_base)
        restore_rope_config(out_dir, model.config.to_dict())
    else:
        from modelopt.torch.export import export_hf_checkpoint

        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out_dir)
    return out_dir


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_checkpoint(tmp_path_factory.mktemp("ckpt") / "fp8", "fp8")


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_checkpoint(tmp_path_factory.mktemp("ckpt") / "none", "none")


def _contract_copy(tmp_path: Path, series: str, edit: Any) -> api.Contract:
    data = json.loads((CONTRACTS / f"tensorrt_llm-{series}.json").read_text())
    edit(data)
    path = tmp_path / f"tensorrt_llm-{series}.json"
    path.write_text(json.dumps(data))
    return api.load_contract(series, path)


# --- the shipped contracts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("series", api.CONTRACT_SERIES)
def test_shipped_contract_lists_everything_kiln_uses(series: str) -> None:
    assert api.missing_uses(api.load_contract(series)) == []


_EVIDENCE = re.compile(r"NVIDIA/TensorRT-LLM:[\w/.-]+\.py@[0-9a-f]{7,40}")


@pytest.mark.parametrize("flag", api.BUILD_FLAGS_USED)
def test_every_emitted_build_flag_cites_the_sources(flag: str) -> None:
    entry = api.load_contract("1.2").build_flags()[flag]
    assert _EVIDENCE.search(entry["evidence"]), f"{flag}: evidence {entry['evidence']!r} names no file@commit"


@pytest.mark.parametrize(
    "section",
    [("llm_api", "llm_args"), ("llm_api", "KvCacheConfig"), ("llm_api", "result"), ("hf_checkpoint",)],
)
@pytest.mark.parametrize("series", api.CONTRACT_SERIES)
def test_every_section_kiln_reads_cites_the_sources(series: str, section: tuple[str, ...]) -> None:
    node = api.load_contract(series).data
    for key in section:
        node = node[key]
    assert node["evidence"].startswith("NVIDIA/TensorRT-LLM:"), node["evidence"]


def test_kiln_recipes_map_to_contract_quant_algos() -> None:
    contract = api.load_contract("1.2")
    assert {s.quant_algo for s in SCHEMES.values() if s.quant_algo} <= contract.quant_algos()
    assert {kv[1] for kv in KV_SCHEMES.values() if kv[1]} <= contract.kv_cache_quant_algos()


# --- a contract that drops something kiln uses --------------------------------------------------------------


def _drop_flag(flag: str):
    def edit(data: dict) -> None:
        cli = data["cli"]["trtllm-build"]
        for group in ("args", "plugin_args"):
            cli[group].pop(flag, None)
            for entry in cli[group].values():  # also as an alias of another flag
                if isinstance(entry, dict) and flag in entry.get("aliases", []):
                    entry["aliases"].remove(flag)

    return edit


@pytest.mark.parametrize("flag", api.BUILD_FLAGS_USED)
def test_dropping_an_emitted_build_flag_fails(tmp_path: Path, fp8_checkpoint: Path, flag: str) -> None:
    contract = _contract_copy(tmp_path, "1.2", _drop_flag(flag))
    assert f"trtllm-build flag {flag!r}" in api.missing_uses(contract)
    with pytest.raises(ContractError, match=re.escape(flag)):
        backend.build_command(fp8_checkpoint, tmp_path / "engine", H100, contract)


def _drop_list_item(path: tuple[str, ...], item: str):
    def edit(data: dict) -> None:
        node = data
        for key in path:
            node = node[key]
        node.remove(item)

    return edit


_LIST_FACTS = (
    [("LLM API argument", ("llm_api", "llm_args", "fields"), name) for name in api.LLM_ARGS_USED]
    + [
        ("KvCacheConfig field", ("llm_api", "KvCacheConfig", "fields"), name)
        for name in api.KV_CACHE_CONFIG_USED
    ]
    + [
        ("SamplingParams field", ("llm_api", "SamplingParams", "fields_verified"), name)
        for name in api.SAMPLING_PARAMS_USED
    ]
    + [
        ("hf_quant_config.json key", ("hf_checkpoint", "keys_read", "quantization"), name)
        for name in api.HF_QUANT_KEYS_USED
    ]
    + [
        ("QuantAlgo value", ("quant_algo",), "FP8"),
        ("kv_cache_quant_algo value", ("quant_algo_meta", "KV_CACHE_QUANT_ALGO_LIST"), "FP8"),
    ]
)


@pytest.mark.parametrize("series", api.CONTRACT_SERIES)
@pytest.mark.parametrize(("kind", "path", "name"), _LIST_FACTS, ids=[f"{k}:{n}" for k, _, n in _LIST_FACTS])
def test_dropping_a_used_api_fact_fails(
    tmp_path: Path, series: str, kind: str, path: tuple[str, ...], name: str
) -> None:
    contract = _contract_copy(tmp_path, series, _drop_list_item(path, name))
    assert f"{kind} {name!r}" in api.missing_uses(contract)


@pytest.mark.parametrize("field", ["max_tokens", "end_id", "top_k", "return_context_logits"])
def test_sampling_params_refuse_a_field_the_contract_lacks(tmp_path: Path, field: str) -> None:
    contract = _contract_copy(
        tmp_path, "1.2", _drop_list_item(("llm_api", "SamplingParams", "fields_verified"), field)
    )
    with pytest.raises(ContractError, match=field):
        api.sampling_kwargs(SamplingParams(max_new_tokens=4), contract, context_logits=True)


@pytest.mark.parametrize("field", ["max_batch_size", "kv_cache_config", "tensor_parallel_size"])
def test_serving_settings_refuse_an_argument_the_contract_lacks(tmp_path: Path, field: str) -> None:
    contract = _contract_copy(tmp_path, "1.3", _drop_list_item(("llm_api", "llm_args", "fields"), field))
    with pytest.raises(ContractError, match=field):
        api.serving_settings(H100_HF, contract)


def test_dropping_an_engine_config_key_fails(tmp_path: Path) -> None:
    contract = _contract_copy(
        tmp_path, "1.2", _drop_list_item(("engine_dir", "config_json_top_level"), "build_config")
    )
    assert "engine config.json key 'build_config'" in api.missing_uses(contract)


def test_a_choice_value_the_contract_does_not_allow_fails(tmp_path: Path, fp8_checkpoint: Path) -> None:
    def edit(data: dict) -> None:
        data["cli"]["trtllm-build"]["args"]["--kv_cache_type"]["choices"] = ["continuous", "disabled"]

    with pytest.raises(ContractError, match="--kv_cache_type paged"):
        backend.build_command(
            fp8_checkpoint, tmp_path / "engine", H100, _contract_copy(tmp_path, "1.2", edit)
        )


# --- what kiln emits, for real checkpoints ------------------------------------------------------------------


def _flags(argv: list[str]) -> dict[str, str | None]:
    flags: dict[str, str | None] = {}
    for index, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--"):
            nxt = argv[index + 1] if index + 1 < len(argv) else None
            flags[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return flags


def test_build_command_for_an_fp8_checkpoint(tmp_path: Path, fp8_checkpoint: Path) -> None:
    contract = api.load_contract("1.2")
    argv = backend.build_command(fp8_checkpoint, tmp_path / "engine", H100, contract)
    flags = _flags(argv)
    assert argv[0] == "trtllm-build"
    assert set(flags) <= set(contract.build_flags())
    assert flags["--checkpoint_dir"] == str(fp8_checkpoint)
    assert (
        flags["--max_batch_size"],
        flags["--max_input_len"],
        flags["--max_seq_len"],
        flags["--max_num_tokens"],
    ) == ("64", "2048", "4096", "8192")
    # trtllm-build keeps FP8 context FMHA with paged context FMHA only for an FP8 KV cache (contract
    # build_logic)
    assert (flags["--use_fp8_context_fmha"], flags["--use_paged_context_fmha"]) == ("disable", "enable")
    assert flags["--kv_cache_type"] == "paged"
    assert "--gather_context_logits" in flags and flags["--gather_context_logits"] is None  # store_true
    assert json.loads((fp8_checkpoint / "config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    print(shlex.join(argv))


@pytest.mark.slow
def test_build_command_for_smollm2_fp8(tmp_path: Path, smollm2_dir: Path) -> None:
    """The real demo model (30 layers, 9/3 heads) calibrated FP8 on CPU: the command the issue note shows."""
    checkpoint = export_checkpoint(tmp_path / "smollm2-fp8", "fp8", model_dir=smollm2_dir)
    argv = backend.build_command(checkpoint, tmp_path / "engine", H100, api.load_contract("1.2"))
    config = json.loads((checkpoint / "config.json").read_text())
    assert (config["num_hidden_layers"], config["quantization"]["quant_algo"]) == (30, "FP8")
    assert _flags(argv)["--use_fp8_context_fmha"] == "disable" and _flags(argv)["--workers"] == "1"
    print(shlex.join(argv))


def test_build_command_for_an_unquantized_checkpoint_has_no_fp8_attention(
    tmp_path: Path, plain_checkpoint: Path
) -> None:
    argv = backend.build_command(plain_checkpoint, tmp_path / "engine", H100, api.load_contract("1.2"))
    assert _flags(argv)["--use_fp8_context_fmha"] == "disable"  # stated: trtllm-build's default is enable
    assert "--gemm_plugin" in argv


def test_build_command_without_logits_for_serving_only(tmp_path: Path, plain_checkpoint: Path) -> None:
    argv = backend.build_command(
        plain_checkpoint, tmp_path / "engine", H100, api.load_contract("1.2"), gather_context_logits=False
    )
    assert "--gather_context_logits" not in argv


def test_build_command_refuses_a_checkpoint_exported_for_another_layout(
    tmp_path: Path, plain_checkpoint: Path
) -> None:
    tp2 = H100.model_copy(
        update={"gpus_per_worker": 2, "limits": H100.limits.model_copy(update={"tp_size": 2})}
    )
    with pytest.raises(ContractError, match="tp 1 x pp 1.*tp 2 x pp 1"):
        backend.build_command(plain_checkpoint, tmp_path / "engine", tp2, api.load_contract("1.2"))


def test_series_without_engine_path_refuses_trtllm_build(tmp_path: Path, plain_checkpoint: Path) -> None:
    with pytest.raises(ContractError, match="artifact: hf_checkpoint"):
        backend.build_command(plain_checkpoint, tmp_path / "engine", H100, api.load_contract("1.3"))


def test_build_command_refuses_an_hf_dir(tmp_path: Path) -> None:
    from kiln.errors import ModelSourceError

    hf = make_tiny_llama(tmp_path / "hf")
    with pytest.raises(ModelSourceError, match="no 'architecture'"):
        backend.build_command(hf, tmp_path / "engine", H100, api.load_contract("1.2"))


@pytest.mark.parametrize(
    ("version", "series"), [("1.2.1", "1.2"), ("1.2.0rc2", "1.2"), ("1.3.0rc27", "1.3"), ("1.4.0", "1.3")]
)
def test_version_maps_to_its_contract(version: str, series: str) -> None:
    assert api.series_for(version) == series


def test_older_versions_are_refused() -> None:
    with pytest.raises(ContractError, match="older than kiln supports"):
        api.series_for("1.1.0")


def test_greedy_sampling_follows_the_llm_api_rule() -> None:
    contract = api.load_contract("1.2")
    greedy = api.sampling_kwargs(SamplingParams(max_new_tokens=8, stop_token_ids=(2,)), contract)
    # _greedy_decoding: top_k in (None, 1) and top_p in (None, 0.0) (contract
    # llm_api.SamplingParams.greedy_rule)
    assert greedy["top_k"] == 1 and "top_p" not in greedy and "temperature" not in greedy
    assert greedy["max_tokens"] == 8 and greedy["stop_token_ids"] == [2] and greedy["detokenize"] is False
    # TensorRT-LLM keeps the stop token, as kiln's torch engine
    assert greedy["include_stop_str_in_output"] is True
    sampled = api.sampling_kwargs(
        SamplingParams(temperature=0.7, top_p=0.9, seed=3), contract, context_logits=True
    )
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["top_k"] is None
    assert sampled["seed"] == 3 and sampled["return_context_logits"] is True


@pytest.mark.parametrize("series", api.CONTRACT_SERIES)
def test_llm_kwargs_stay_inside_the_contract(series: str) -> None:
    contract = api.load_contract(series)
    settings = api.serving_settings(H100_HF, contract)
    kwargs = api.llm_kwargs("hf_checkpoint", Path("/ckpt"), settings, contract)
    assert set(kwargs) <= contract.llm_args_fields()
    assert set(kwargs["kv_cache_config"]) <= contract.kv_cache_config_fields()
    assert kwargs["kv_cache_config"]["enable_block_reuse"] is False  # validation: full-length context logits
    assert settings["kv_cache_config"]["enable_block_reuse"] is True  # what is published for serving
    assert (kwargs["max_batch_size"], kwargs["max_seq_len"], kwargs["tensor_parallel_size"]) == (64, 4096, 1)


def test_hf_quant_config_with_an_unknown_algo_is_refused() -> None:
    contract = api.load_contract("1.3")
    assert api.check_hf_quant_config(
        {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}, "x", contract
    ) == ("FP8", "FP8")
    with pytest.raises(ContractError, match="FP9"):
        api.check_hf_quant_config({"quantization": {"quant_algo": "FP9"}}, "x", contract)


def test_contract_copy_helper_does_not_touch_the_shipped_file(tmp_path: Path) -> None:
    before = (CONTRACTS / "tensorrt_llm-1.2.json").read_text()
    _contract_copy(tmp_path, "1.2", lambda data: data.clear())
    assert (CONTRACTS / "tensorrt_llm-1.2.json").read_text() == before


# --- which HF architectures each artifact path accepts ------------------------------------------------------

_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
)


@pytest.mark.parametrize("series", api.CONTRACT_SERIES)
def test_architecture_facts_cite_evidence_for_both_artifacts(series: str) -> None:
    arch = json.loads((CONTRACTS / f"tensorrt_llm-{series}.json").read_text())["architectures"]
    entries = {
        f"{kind}.{name}": entry for kind in ("engine", "hf_checkpoint") for name, entry in arch[kind].items()
    }
    entries |= {
        f"moe_quant_algos.{kind}.{algo}": entry
        for kind, algos in arch["moe_quant_algos"].items()
        for algo, entry in algos.items()
    }
    for where, entry in entries.items():
        assert entry["supported"] is None or isinstance(entry["supported"], bool), where
        assert isinstance(entry["evidence"], str) and entry["evidence"].strip(), where
        if entry["supported"] is None:  # a fact not confirmed from a source says so
            assert "UNVERIFIED" in entry.get("note", ""), where
    for kind in ("engine", "hf_checkpoint"):
        assert set(_ARCHITECTURES) <= set(arch[kind]), (
            f"{series} {kind}: missing {set(_ARCHITECTURES) - set(arch[kind])}"
        )
    assert {"FP8", "W8A16", "W8A8_SQ_PER_CHANNEL"} <= set(arch["moe_quant_algos"]["hf_checkpoint"])
    assert all(isinstance(item, str) and item for item in arch["unverified"])
    if series == "1.3":  # no engine path from 1.3 on
        assert not any(entry["supported"] for entry in arch["engine"].values())


# --- what trtllm-build really builds: FP8 context FMHA and paged context FMHA (issue 18 item 5) -------------


def _facts(quant_algo: str | None, kv: str | None) -> api.CheckpointFacts:
    return api.CheckpointFacts(
        architecture="LlamaForCausalLM",
        dtype="bfloat16",
        quant_algo=quant_algo,
        kv_cache_quant_algo=kv,
        world_size=1,
        tp_size=1,
        pp_size=1,
        producer={},
    )


@pytest.mark.parametrize(
    ("quant_algo", "kv", "sm", "paged", "fp8"),
    [
        ("FP8", None, 90, True, False),  # paged context FMHA keeps FP8 context FMHA only with an FP8 KV cache
        ("FP8", "FP8", 90, True, True),
        (
            "FP8",
            "FP8",
            80,
            False,
            False,
        ),  # below SM89 FP8 context FMHA is off, and then so is paged context FMHA
        ("W4A8_AWQ", "FP8", 89, True, True),
        ("NVFP4", "FP8", 100, True, True),
        # not an FP8 workflow: an FP8 KV cache switches paged context FMHA off
        ("W4A16_AWQ", "FP8", 90, False, False),
        ("W8A8_SQ_PER_CHANNEL", None, 90, True, False),
        (None, "FP8", 80, False, False),
        ("W4A16_AWQ", "INT8", 90, False, False),  # INT8 KV cache: no paged context FMHA
        # not in the builder's list (kiln's old one had it)
        ("FP8_PER_CHANNEL_PER_TOKEN", "FP8", 90, False, False),
    ],
)
def test_attention_plugins_are_what_trtllm_build_keeps(
    tmp_path: Path, quant_algo: str | None, kv: str | None, sm: int, paged: bool, fp8: bool
) -> None:
    contract = api.load_contract("1.2")
    plugins = api.attention_plugins(_facts(quant_algo, kv), sm, contract)
    assert (plugins.use_paged_context_fmha, plugins.use_fp8_context_fmha) == (paged, fp8)
    assert plugins.notes or (paged and fp8)  # every switch-off is explained
    target = H100.model_copy(update={"sm": f"sm{sm}"})
    flags = _flags(
        api.trtllm_build_command(tmp_path, tmp_path / "engine", target, _facts(quant_algo, kv), contract)
    )
    onoff = {True: "enable", False: "disable"}
    assert (flags["--use_paged_context_fmha"], flags["--use_fp8_context_fmha"]) == (onoff[paged], onoff[fp8])


def test_build_logic_cites_the_builder() -> None:
    logic = api.load_contract("1.2").data["build_logic"]["fp8_context_fmha"]
    assert set(logic["quant_algos"]) == {"FP8", "W4A8_AWQ", "NVFP4"} and logic["min_sm"] == 89
    assert _EVIDENCE.search(logic["evidence"]) and "builder.py" in logic["evidence"]
    with pytest.raises(ContractError, match="build_logic"):
        api.attention_plugins(
            _facts("FP8", None), 90, api.Contract("1.2", {"kiln": {"engine_path": True}}, "x")
        )


# --- kiln's own exports vs what 1.2's trtllm-build loads (issue 18 items 1 and 8) ---------------------------


def _kiln_export(tmp_path: Path, quantization: str, kv: str = "auto", tp: int = 1) -> Path:
    import random

    from kiln.calibration import TokenSet, token_sha256
    from kiln.profiles import Recipe
    from kiln.quantize import quantize

    model_dir = make_tiny_llama(tmp_path / "src")
    rng = random.Random(1)
    ids = [[rng.randrange(256) for _ in range(32)] for _ in range(4)]
    result = quantize(
        model_dir,
        Recipe(name="r", quantization=quantization, kv_cache_dtype=kv, group_size=32),
        layouts=[(tp, 1)],
        output_dir=tmp_path / "out",
        dtype="bfloat16",
        device="cpu",
        lineage={},
        calibration=TokenSet(ids, token_sha256(ids), "random"),
        formats=("trtllm",),
    )
    return result.trtllm_dirs[f"tp{tp}pp1"]


def test_an_fp8_kv_export_builds_with_fp8_context_fmha(tmp_path: Path) -> None:
    argv = backend.build_command(
        _kiln_export(tmp_path, "fp8", kv="fp8"), tmp_path / "engine", H100, api.load_contract("1.2")
    )
    assert (_flags(argv)["--use_fp8_context_fmha"], _flags(argv)["--use_paged_context_fmha"]) == (
        "enable",
        "enable",
    )


def test_a_modelopt_w8a16_checkpoint_is_refused_before_trtllm_build(tmp_path: Path) -> None:
    """ModelOpt's W8A16 checkpoint has int8 weights + weights_scaling_factor; trtllm-build's W8A16 layer wants
    per_channel_scale and quantizes only float weights itself: refused with the reason (pre-flight refuses the
    pair)."""
    checkpoint = _kiln_export(tmp_path, "int8_wo")
    with pytest.raises(ContractError, match=r"lack 'per_channel_scale'.*Required but not provided tensors"):
        backend.build_command(checkpoint, tmp_path / "engine", H100, api.load_contract("1.2"))


def test_kiln_int4_wo_checkpoint_loads_where_modelopt_s_own_does_not(tmp_path: Path) -> None:
    import shutil

    contract = api.load_contract("1.2")
    raw = shutil.copytree(_kiln_export(tmp_path / "raw", "int4_wo"), tmp_path / "raw-int4")
    config = json.loads((raw / "config.json").read_text())
    # what ModelOpt 0.47 writes, with no prequant_scaling_factor
    config["quantization"]["pre_quant_scale"] = True
    (raw / "config.json").write_text(json.dumps(config))
    assert not any(k.endswith("prequant_scaling_factor") for k in backend.checkpoint_tensors(raw, 0))
    with pytest.raises(ContractError, match="lack 'prequant_scaling_factor'"):
        backend.build_command(raw, tmp_path / "engine", H100, contract)
    for tp in (1, 2):
        checkpoint = _kiln_export(tmp_path / f"tp{tp}", "int4_wo", tp=tp)
        assert (
            json.loads((checkpoint / "config.json").read_text())["quantization"]["pre_quant_scale"] is False
        )
        target = H100.model_copy(
            update={"gpus_per_worker": tp, "limits": H100.limits.model_copy(update={"tp_size": tp})}
        )
        backend.build_command(checkpoint, tmp_path / f"engine{tp}", target, contract)  # readable


def test_checkpoint_reader_refuses_what_trtllm_build_would_misread(
    tmp_path: Path, plain_checkpoint: Path
) -> None:
    import shutil

    contract = api.load_contract("1.2")
    for edit, message in [
        (lambda c: c.pop("rotary_base"), "no rotary_base"),
        (lambda c: c["quantization"].update(sparsity=0.5), "not QuantConfig fields"),
        (lambda c: c.pop("num_attention_heads"), "lacks 'num_attention_heads'"),
    ]:
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(plain_checkpoint, copy)
        config = json.loads((copy / "config.json").read_text())
        edit(config)
        (copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(ContractError, match=message):
            backend.check_readable(copy, backend.read_checkpoint(copy), contract)


def test_checkpoint_reader_facts_cite_the_sources() -> None:
    reader = api.load_contract("1.2").data["checkpoint_reader"]
    assert _EVIDENCE.search(reader["evidence"]) and "modeling_utils.py" in reader["evidence"]
    assert {
        "quant_algo",
        "kv_cache_quant_algo",
        "group_size",
        "has_zero_point",
        "pre_quant_scale",
        "exclude_modules",
    } <= set(reader["quantization_fields"])  # what ModelOpt 0.47 writes
    assert reader["linear_tensors"]["W8A16"] == ["weight", "per_channel_scale"]
    assert "UNVERIFIED" in reader["verdict"] and reader["unverified"]


def test_stop_token_trimming_is_in_the_contract() -> None:
    for series in api.CONTRACT_SERIES:
        fact = api.load_contract(series).data["llm_api"]["result"]["stop_token_trimming"]
        assert _EVIDENCE.search(fact["evidence"]) and "include_stop_str_in_output" in fact["rule"]
