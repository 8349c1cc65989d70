"""Build keys and the step result cache: identical inputs reuse, any content change misses, crashes never
count."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln import cache
from kiln.hub import ModelSnapshot as Snapshot
from kiln.profiles import BuildLimits, Recipe, Target
from kiln.steps.checkpoint import BASELINE, Checkpoint, checkpoint_key
from kiln.steps.engine import engine_key


@dataclass(frozen=True)
class Result:
    path: Path
    value: int


def test_build_key_ignores_mapping_order_and_changes_with_any_input():
    a = cache.build_key(model_sha="abc", recipe={"q": "fp8", "kv": "auto"}, target="cpu")
    assert a == cache.build_key(target="cpu", recipe={"kv": "auto", "q": "fp8"}, model_sha="abc")
    assert a != cache.build_key(model_sha="abd", recipe={"q": "fp8", "kv": "auto"}, target="cpu")
    assert a != cache.build_key(model_sha="abc", recipe={"q": "fp8", "kv": "fp8"}, target="cpu")
    assert len(a) == 64 and int(a, 16) >= 0


def test_build_key_accepts_pydantic_models_and_dataclasses():
    target = Target(name="cpu")
    assert cache.build_key(t=target) == cache.build_key(t=target.model_dump(mode="json"))
    assert cache.build_key(r=Result(Path("/x"), 1)) == cache.build_key(r={"path": "/x", "value": 1})


def test_toolchain_versions_names_the_installed_stack():
    versions = cache.toolchain_versions()
    assert {"torch", "transformers", "nvidia-modelopt"} <= set(versions)
    import torch

    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__


def test_step_cache_computes_once_then_reuses(tmp_path: Path):
    calls = []

    def compute(out: Path) -> Result:
        calls.append(out)
        (out / "weights.bin").write_bytes(b"x" * 10)
        return Result(out / "weights.bin", 7)

    step = cache.StepCache("compile", root=tmp_path)
    first = step.run("k1", compute, Result)
    second = step.run("k1", compute, Result)
    assert (first.reused, second.reused) == (False, True)
    assert second.value == first.value and second.value.path.read_bytes() == b"x" * 10
    assert len(calls) == 1
    assert step.run("k2", compute, Result).reused is False and len(calls) == 2


def test_a_crashed_step_leaves_no_entry_and_is_recomputed(tmp_path: Path):
    step = cache.StepCache("quantize", root=tmp_path)

    def crash(out: Path) -> Result:
        (out / "half-written").write_text("partial")
        raise RuntimeError("killed mid-export")

    with pytest.raises(RuntimeError):
        step.run("k", crash, Result)
    assert step.get("k", Result) is None
    hit = step.run("k", lambda out: Result(out, 1), Result)
    assert hit.reused is False and not (hit.value.path / "half-written").exists()


def test_an_unreadable_record_is_a_miss(tmp_path: Path):
    step = cache.StepCache("validate", root=tmp_path)
    step.put("k", {"unexpected": "shape"})
    assert step.get("k", Result) is None


def _count_compute(root: str, marker: str) -> bool:
    def compute(out: Path) -> Result:
        with open(marker, "a") as fh:
            fh.write("x")
        import time

        time.sleep(0.5)
        return Result(out, 1)

    return cache.StepCache("compile", root=Path(root)).run("shared", compute, Result).reused


def test_two_processes_sharing_a_cache_compute_a_step_once(tmp_path: Path):
    marker = tmp_path / "calls"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        reused = pool.starmap(_count_compute, [(str(tmp_path / "c"), str(marker))] * 2)
    assert marker.read_text() == "x"
    assert sorted(reused) == [False, True]


SNAPSHOT = Snapshot(path=Path("/m"), sha="a" * 40, source="hub", repo_id="org/m", revision="main")


def test_checkpoint_key_depends_on_weights_inputs_only():
    none = Recipe(name="none", quantization="none", gates={"max_ppl_increase_pct": 1})
    assert checkpoint_key(SNAPSHOT, none, None, ["tp1pp1"], "float32") == checkpoint_key(
        SNAPSHOT, BASELINE, None, ["tp1pp1"], "float32"
    )
    fp8 = Recipe(name="fp8", quantization="fp8")
    base = checkpoint_key(SNAPSHOT, fp8, "cal1", ["tp1pp1"], "bfloat16")
    assert base == checkpoint_key(
        SNAPSHOT, fp8.model_copy(update={"name": "renamed"}), "cal1", ["tp1pp1"], "bfloat16"
    )
    assert base != checkpoint_key(SNAPSHOT, fp8, "cal2", ["tp1pp1"], "bfloat16")
    assert base != checkpoint_key(SNAPSHOT, fp8, "cal1", ["tp1pp1", "tp2pp1"], "bfloat16")
    assert base != checkpoint_key(SNAPSHOT, fp8, "cal1", ["tp1pp1"], "bfloat16", ["trtllm", "hf"])
    other_model = Snapshot(path=Path("/m"), sha="b" * 40, source="hub")
    assert base != checkpoint_key(other_model, fp8, "cal1", ["tp1pp1"], "bfloat16")


def test_changing_one_targets_limits_changes_only_its_engine_key():
    checkpoint = Checkpoint("fp8", "ck", {"tp1pp1": Path("/c")}, None, None)
    a, b = Target(name="a"), Target(name="b")
    keys = {t.name: engine_key(checkpoint, t) for t in (a, b)}
    a2 = a.model_copy(update={"limits": BuildLimits(max_batch_size=16)})
    assert engine_key(checkpoint, a2) != keys["a"]
    assert engine_key(checkpoint, b) == keys["b"]
    assert engine_key(checkpoint, a.model_copy(update={"work_pool": "elsewhere"})) == keys["a"]
