"""Tensor parallelism: a checkpoint exported with tp_size 2 runs as 2 gloo ranks and equals tp=1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
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


def target(tp: int) -> Target:
    return Target(name="cpu-test", dtype="float32",
                  limits={"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64, "tp_size": tp})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(engine_dir: Path, out: Path, world: int) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(engine_dir), json.dumps(PROMPTS), str(out)],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("recipe", ["none", pytest.param("int4_awq", marks=pytest.mark.slow)])
def test_tp2_over_gloo_equals_tp1(tmp_path: Path, recipe: str) -> None:
    # heads 4 / kv heads 2 split evenly; hidden 128 keeps two INT4 groups of 64 per row-parallel shard
    hf = make_tiny_llama(tmp_path / "hf", hidden=128, intermediate=256)
    ck1, _ = export_checkpoint(hf, tmp_path / "ck1", recipe)  # calibration is deterministic: same scales
    ck2, _ = export_checkpoint(hf, tmp_path / "ck2", recipe, tp_size=2)
    assert json.loads((ck2 / "config.json").read_text())["mapping"]["tp_size"] == 2
    assert (ck2 / "rank1.safetensors").is_file()
    backend = TorchBackend()
    one = backend.load(backend.compile(ck1, target(1), tmp_path / "e1", {}))
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=12)) for p in PROMPTS]
    requests.append(GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)))
    expected = [r.token_ids for r in one.generate(requests, concurrency=2)]
    expected_logits = one.logits(PROMPTS[0])

    engine2 = backend.compile(ck2, target(2), tmp_path / "e2", {})
    ranks = run_ranks(engine2, tmp_path / "out", 2)
    for rank in ranks:  # every rank returns the same results: rank 0 samples and broadcasts
        assert rank["tokens"] == expected
        assert torch.tensor(rank["logits"]).sub(expected_logits).abs().max().item() < 1e-4
    with pytest.raises(EngineMismatchError, match="engine has tp_size 2 but this process group has 1 rank"):
        backend.load(engine2)
