"""Tensor and pipeline parallelism: checkpoints exported with tp_size 2, pp_size 2 or both run as one gloo
rank per shard and equal tp=1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from kiln.engine.base import GenerationRequest, SamplingParams
from kiln.engine.torch import TorchBackend
from kiln.errors import EngineMismatchError
from kiln.profiles import Target
from tests.fixtures.engine import export_checkpoint
from tests.fixtures.models import make_tiny_llama
from tests.fixtures.parallel import launch_ranks

# One rank: load the engine under the env:// process group, generate, dump what rank N saw.
WORKER = """
import json, sys
import torch.distributed as dist
from kiln.engine.base import GenerationRequest, SamplingParams
from kiln.engine.torch import TorchBackend

dist.init_process_group("gloo")
engine_dir, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
engine = TorchBackend().load(engine_dir)
requests = [GenerationRequest(p, SamplingParams(max_new_tokens=12)) for p in prompts]
requests.append(GenerationRequest(prompts[0], SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)))
results = engine.generate(requests, concurrency=2)
logits = engine.logits(prompts[0])
with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
    json.dump({"tokens": [r.token_ids for r in results], "logits": logits.tolist()}, f)
dist.destroy_process_group()
"""

PROMPTS = [[5, 9, 77, 3, 120, 41], [200, 1, 18], [64, 64, 12, 99, 250, 7, 31, 8, 2]]


def target(tp: int, pp: int = 1) -> Target:
    return Target(
        name="cpu-test",
        dtype="float32",
        limits={"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64, "tp_size": tp, "pp_size": pp},
    )


def run_ranks(engine_dir: Path, out: Path, world: int) -> list[dict]:
    launch_ranks([sys.executable, "-c", WORKER, str(engine_dir), json.dumps(PROMPTS), str(out)], world)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


LAYOUTS = [
    pytest.param("none", 2, 1, id="none-tp2"),
    pytest.param("int4_awq", 2, 1, id="int4_awq-tp2", marks=pytest.mark.slow),
    pytest.param("none", 1, 2, id="none-pp2"),
    pytest.param("fp8", 1, 2, id="fp8-pp2"),
    pytest.param("none", 2, 2, id="none-tp2pp2"),
]


@pytest.mark.parametrize(("recipe", "tp", "pp"), LAYOUTS)
def test_parallel_ranks_over_gloo_equal_one_rank(tmp_path: Path, recipe: str, tp: int, pp: int) -> None:
    # heads 4 / kv heads 2 split evenly; hidden 128 keeps two INT4 groups of 64 per row-parallel shard;
    # 4 layers give each pipeline stage 2 (the export numbers every stage's layers from 0)
    hf = make_tiny_llama(tmp_path / "hf", hidden=128, intermediate=256, layers=4)
    ck1, _ = export_checkpoint(hf, tmp_path / "ck1", recipe)  # calibration is deterministic: same scales
    ckn, _ = export_checkpoint(hf, tmp_path / "ckn", recipe, tp_size=tp, pp_size=pp)
    mapping = json.loads((ckn / "config.json").read_text())["mapping"]
    assert (mapping["tp_size"], mapping["pp_size"]) == (tp, pp)
    assert (ckn / f"rank{tp * pp - 1}.safetensors").is_file()
    backend = TorchBackend()
    one = backend.load(backend.compile(ck1, target(1), tmp_path / "e1", {}))
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=12)) for p in PROMPTS]
    requests.append(GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)))
    expected = [r.token_ids for r in one.generate(requests, concurrency=2)]
    expected_logits = one.logits(PROMPTS[0])

    engine_n = backend.compile(ckn, target(tp, pp), tmp_path / "en", {})
    ranks = run_ranks(engine_n, tmp_path / "out", tp * pp)
    for rank in ranks:  # every rank returns the same results: the sampler samples and broadcasts
        assert rank["tokens"] == expected
        assert torch.tensor(rank["logits"]).sub(expected_logits).abs().max().item() < 1e-4
    with pytest.raises(
        EngineMismatchError,
        match=rf"engine has tp_size {tp} x pp_size {pp} = {tp * pp} rank\(s\) but "
        "this process group has 1",
    ):
        backend.load(engine_n)
