"""``kiln bench ENGINE_DIR`` next to ``kiln bench --url`` against ``kiln serve`` on one CUDA GPU, in one run,
same prompts (run by hand; not a test).

Engine: a RANDOM-WEIGHT Llama-3.2-1B-shaped model built as ``bench/engine_gpu.py`` builds it (its ``SHAPE``,
``build_hf``, ``write_checkpoint``, ``target``: bf16, Inductor + CUDA graphs, max_batch_size 64), compiled by
``TorchBackend``. ``kiln serve`` detokenizes what it streams, so the engine dir carries a tokenizer of the
model's 128,256 ids: SmolLM2's byte-level BPE (``--tokenizer``; no Llama 3 tokenizer travels to the GPU
machine) with its vocabulary extended by ordinary ASCII tokens (" qzx", ...), so every id the random model
emits decodes as a real one does.

Then, per concurrency level (1, 8, 32, 64; 128 prompt tokens of seeded ids -> exactly 128 greedy tokens),
one after the other on the same prompts, both through ``kiln.validation.perf.sweep``:

- in process: the engine loaded here, ``EngineRounds`` (what ``kiln bench ENGINE_DIR`` runs);
- over HTTP: ``kiln serve ENGINE_DIR`` as a subprocess on a free loopback port (its engine in a process of
  its own), ``OpenAIRounds`` (what ``kiln bench --url`` runs: streaming completions from several client
  processes), with the CPU the server's two processes spent per generated token.

With ``--fast-site DIR`` (httptools and uvloop installed there, what ``uvicorn[standard]`` adds) a second
server runs with DIR on its PYTHONPATH, so uvicorn picks them, and the sweep over HTTP is repeated; with
``--no-wait-too`` one runs with ``--batch-wait-ms 0`` (an idle engine never waits for a burst's
stragglers: the before of that setting).
``--budget-s`` bounds the run: a stage that would start past it is skipped and recorded. Writes
``serve_gpu.json`` (after every stage) and ``serve_gpu.md`` into ``--out``.

    python bench/serve_gpu.py --out $OUT --budget-s 200 [--fast-site /tmp/site-fast]
    python bench/serve_gpu.py --tiny --out /tmp/sg          # the whole run on CPU with a tiny model
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import engine_gpu  # noqa: E402
from bench.serve_cpu import KilnServe, overhead, server_cost, table  # noqa: E402

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def extended_tokenizer(source: Path, out: Path, vocab_size: int) -> Path:
    """``source``'s byte-level BPE tokenizer with ordinary tokens ("Ġ" + lowercase letters, i.e. " ab", "
    abc",
    ...) added to its vocabulary up to ``vocab_size`` ids, so that every id of the model decodes to text."""
    data = json.loads((source / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    if data["model"]["type"] != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise SystemExit(f"{source}: expected a byte-level BPE tokenizer (as SmolLM2's)")
    words = (
        "Ġ" + "".join(c)
        for n in itertools.count(2)
        for c in itertools.product(string.ascii_lowercase, repeat=n)
    )
    while len(vocab) < vocab_size:
        word = next(words)
        if word not in vocab:
            vocab[word] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name transformers 4.x and 5.x both know
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES[2:]:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return out


def build_engine(work: Path, tokenizer: Path, tiny: bool, max_batch_size: int = 8) -> Path:
    """The random-weight engine dir (``tiny``: a 2-layer model of the same vocabulary on a cpu target of
    ``max_batch_size`` slots)."""
    from kiln.engine.torch import TorchBackend
    from kiln.profiles import Target

    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**{**engine_gpu.SHAPE, **TINY}, architectures=["LlamaForCausalLM"])
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
        target = Target(
            name="cpu",
            dtype="float32",
            # one prefill may take a full batch of 128-token prompts, as the GPU target's 8192
            limits={
                "max_batch_size": max_batch_size,
                "max_input_len": 256,
                "max_seq_len": 512,
                "max_num_tokens": 128 * max_batch_size,
            },
        )
    else:
        model, target = engine_gpu.build_hf(), engine_gpu.target()
    checkpoint = engine_gpu.write_checkpoint(model, work / "checkpoint", fp8=False)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return TorchBackend().compile(
        checkpoint,
        target,
        work / "engine",
        {"model_sha": "random-llama-3.2-1b-shape"},
        tokenizer_dir=tokenizer,
    )


def environment(args: argparse.Namespace) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in (
        "transformers",
        "tokenizers",
        "fastapi",
        "starlette",
        "uvicorn",
        "h11",
        "httpx",
        "pydantic",
        "prometheus_client",
        "triton",
    ):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "none (CPU)",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "versions": versions,
        "command": " ".join(["python bench/serve_gpu.py", *sys.argv[1:]]),
        "shape": engine_gpu.SHAPE,
        "limits": engine_gpu.LIMITS,
        "model": "random-weight Llama-3.2-1B shape" + (" (tiny)" if args.tiny else ""),
    }


def requests_at(level: int, args: argparse.Namespace) -> int:
    """Timed requests at a level: at least ``--requests``, and ``--rounds`` full rounds."""
    return max(args.requests, args.rounds * level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results"))
    parser.add_argument("--budget-s", type=float, default=200)
    parser.add_argument("--concurrency", help="levels (default 1,8,32,64; with --tiny 1,8)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--requests", type=int, default=16, help="timed requests per level at least")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per level at least")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="a byte-level BPE tokenizer dir (default: "
        ".whl/serve/tokenizer-smollm2, else SmolLM2's in $KILN_HOME/assets)",
    )
    parser.add_argument("--fast-site", type=Path, help="a dir with httptools + uvloop for a second server")
    parser.add_argument(
        "--no-wait-too",
        action="store_true",
        help="a second server with --batch-wait-ms 0 (the idle engine never waits for a burst: before/after)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer model on the CPU: the run's logic only"
    )
    parser.add_argument("--render", type=Path, help="only rewrite serve_gpu.md from this serve_gpu.json")
    args = parser.parse_args()
    if args.render:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_gpu.md").write_text(markdown(json.loads(args.render.read_text())))
        return
    levels = sorted({int(c) for c in (args.concurrency or ("1,8" if args.tiny else "1,8,32,64")).split(",")})
    run = engine_gpu.Run(args.out, args.budget_s, name="serve_gpu.json")
    r = run.results
    site = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    server_env = {**os.environ, "PYTHONPATH": site}
    r["env"] = environment(args)
    r["settings"] = {
        "levels": levels,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "requests": {c: requests_at(c, args) for c in levels},
        "warmup_rounds": 1,
    }
    work = Path(tempfile.mkdtemp(prefix="kiln-serve-gpu-"))
    source = args.tokenizer or next(
        (
            p
            for p in (
                ROOT / ".whl" / "serve" / "tokenizer-smollm2",
                Path(os.environ.get("KILN_HOME") or Path.home() / ".kiln")
                / "assets"
                / "SmolLM2-135M-Instruct",
            )
            if p.is_dir()
        ),
        None,
    )
    if source is None:
        raise SystemExit("no tokenizer: pass --tokenizer DIR (SmolLM2's tokenizer files)")
    tokenizer = extended_tokenizer(source, work / "tokenizer", engine_gpu.SHAPE["vocab_size"])
    engine_dir = run.stage("build_engine", build_engine, work, tokenizer, args.tiny, max(8, *levels))
    if engine_dir is None:
        return
    from kiln.engine.torch import TorchBackend
    from kiln.validation.perf import BenchPrompt, EngineRounds, decode_cost_from_dir, seeded_prompts, sweep

    prompts = [
        BenchPrompt(p, args.output_len)
        for p in seeded_prompts(
            max(requests_at(c, args) for c in levels), args.input_len, engine_gpu.SHAPE["vocab_size"], seed=0
        )
    ]
    engine = run.stage("load_in_process", TorchBackend().load, engine_dir)
    if engine is None:
        return
    device = engine.manifest.device
    in_process = EngineRounds(engine)
    # every level once, untimed, before a server starts: Inductor's compiles land in the on-disk cache the
    # server's engine process then reads, and nothing compiles while the other side is measured
    run.stage("warm_up_in_process", lambda: [in_process(prompts[:c]) for c in levels])
    settings = {
        "device": device,
        "max_batch_size": engine.max_batch_size,
        "decode_cost": decode_cost_from_dir(engine_dir),
        "peak_memory_bytes": engine.memory_bytes,
    }

    def measure_engine(level: int) -> dict:
        return sweep(
            in_process,
            [level],
            prompts,
            prompt_len=args.input_len,
            gen_len=args.output_len,
            min_requests=requests_at(level, args),
            **settings,
        ).to_dict()

    variants: list[tuple[str, dict[str, str], tuple[str, ...]]] = [("plain", server_env, ())]
    if args.no_wait_too:
        variants.append(("no-wait", server_env, ("--batch-wait-ms", "0")))
    if args.fast_site:
        fast_env = {**server_env, "PYTHONPATH": os.pathsep.join([str(args.fast_site), site])}
        variants.append(("fast", fast_env, ()))
    r["engine"], r["servers"] = {}, {}
    for name, env, server_args in variants:
        server = run.stage(
            f"start_server_{name}",
            KilnServe,
            engine_dir,
            env,
            work / f"serve-{name}.log",
            *server_args,
            timeout_s=max(60.0, args.budget_s - run.elapsed()),
            needs_s=30 if name != "plain" else 0,
        )
        if server is None:
            continue
        record = r["servers"][name] = {
            "ready_s": round(server.ready_s, 1),
            "points": [],
            "server_cpu": [],
            "fast_modules": _fast_modules(env),
        }
        try:
            from kiln.serve.client import OpenAIRounds

            over_http = OpenAIRounds(server.url)
            record["client_processes"] = over_http.processes
            for level in levels:
                if name == "plain":  # in process first, then the same level over HTTP
                    point = run.stage(f"in_process_c{level}", measure_engine, level, needs_s=5)
                    if point:
                        r["engine"].setdefault("points", []).extend(point["points"])
                        r["engine"].update({k: v for k, v in point.items() if k not in ("points", "skipped")})
                measured = run.stage(
                    f"url_{name}_c{level}", measure_url, server, over_http, level, prompts, args, needs_s=5
                )
                if measured:
                    record["points"].extend(measured["points"])
                    record["server_cpu"].append(measured["server_cpu"])
                    record.setdefault("before_first_token", []).append(measured["before_first_token"])
                    record.setdefault("engine_steps_by_batch", {})[level] = measured["engine_steps_by_batch"]
            over_http.close()
        finally:
            server.stop()
            record["log_tail"] = server.log_tail(3000)
        r["overhead"] = r.get("overhead") or {}
        r["overhead"][name] = overhead(r["engine"].get("points", []), record["points"])
        run.save()
    engine.close()
    run.save()
    (args.out / "serve_gpu.md").write_text(markdown(r))
    print(markdown(r))


def _fast_modules(env: dict[str, str]) -> list[str]:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u; print(','.join(m for m in "
            "('httptools', 'uvloop') if u.find_spec(m)))",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return [m for m in probe.stdout.strip().split(",") if m]


def measure_url(server: KilnServe, over_http, level: int, prompts: list, args: argparse.Namespace) -> dict:
    """One level over HTTP, with the CPU seconds per token of the server's processes meanwhile."""
    from kiln.validation.perf import sweep

    tokens, cpu, steps = server.generated_tokens(), server.cpu(), server.metrics("kiln_batch_size_bucket")
    before = server.metrics("kiln_")
    result = sweep(
        over_http,
        [level],
        prompts,
        prompt_len=args.input_len,
        gen_len=args.output_len,
        min_requests=requests_at(level, args),
        device="remote",
    ).to_dict()
    cost = server_cost(cpu, server.cpu(), server.generated_tokens() - tokens)
    # how many requests each engine step served (cumulative buckets)
    after = server.metrics("kiln_batch_size_bucket")
    return {
        "points": result["points"],
        "server_cpu": {"concurrency": level, **cost},
        "before_first_token": {
            "concurrency": level,
            **first_token_breakdown(before, server.metrics("kiln_")),
        },
        "engine_steps_by_batch": {
            k.split('le="')[1].rstrip('"}'): after[k] - steps.get(k, 0.0) for k in after
        },
    }


BREAKDOWN = (
    ("http", "kiln_request_submit_time_seconds"),
    ("wire", "kiln_request_wire_time_seconds"),
    ("queue", "kiln_request_queue_time_seconds"),
    ("prefill", "kiln_request_prefill_time_seconds"),
)


def histogram_delta(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, float | None]:
    """Count, mean and p50 / p90 (the upper bound of the bucket they fall in) of what a Prometheus
    histogram observed between two scrapes."""
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
    buckets = sorted(
        (float(k.split('le="')[1].rstrip('"}')), v - before.get(k, 0.0))
        for k, v in after.items()
        if k.startswith(f"{name}_bucket")
    )

    def quantile(q: float) -> float | None:
        return (
            next((bound for bound, cumulative in buckets if cumulative >= q * count), None) if count else None
        )

    return {
        "count": count,
        "mean": total / count if count else None,
        "p50": quantile(0.5),
        "p90": quantile(0.9),
    }


def first_token_breakdown(before: dict[str, float], after: dict[str, float]) -> dict:
    """Where the requests' time before their first token went (ms; p50 / p90 are bucket bounds) and how
    many requests each prefill admitted, from the server's /metrics before and after a level."""
    out: dict = {}
    for key, name in BREAKDOWN:
        d = histogram_delta(before, after, name)
        out[key] = {
            "requests": int(d["count"]),
            **{q: None if d[q] is None else round(d[q] * 1e3, 3) for q in ("mean", "p50", "p90")},
        }
    waves = histogram_delta(before, after, "kiln_prefill_batch_size")
    out["prefills"] = int(waves["count"])
    out["requests_per_prefill"] = None if waves["mean"] is None else round(waves["mean"], 2)
    return out


def breakdown_table(rows: list[dict], counted: str = "its warm-up round included") -> list[str]:
    """The markdown table of ``first_token_breakdown`` rows (one per level); ``counted``: which of a
    level's requests the scrapes around it saw."""
    if not rows:
        return []
    lines = [
        "Before the first token (from the server's /metrics; mean / p90 ms, p90 a bucket bound): HTTP "
        "process (arrival to submit frame written), wire (to the engine process reading it), queue (to its "
        f"prefill starting), prefill; and the prefills a level's requests took ({counted}).",
        "",
        "| concurrency | HTTP ms | wire ms | queue ms | prefill ms | prefills / requests "
        "| requests per prefill |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in rows:
        cells = [f"{b[k]['mean']} / {b[k]['p90']}" for k, _ in BREAKDOWN]
        lines.append(
            f"| {b['concurrency']} | {' | '.join(cells)} | {b['prefills']} / {b['prefill']['requests']} "
            f"| {b['requests_per_prefill']} |"
        )
    return lines


def markdown(r: dict) -> str:
    env = r.get("env", {})
    s = r.get("settings", {})
    lines = [
        f"# kiln serve on {env.get('gpu')}: in process vs over HTTP, {env.get('model')}",
        "",
        f"Command: `{env.get('command')}` (torch {env.get('torch')}, CUDA {env.get('cuda')}, Python "
        f"{env.get('python')}, {env.get('cpus')} CPUs; {json.dumps(env.get('versions'))}).",
        "",
        f"Workload: {s.get('input_len')} prompt tokens (seeded random ids, the same for both) -> exactly "
        f"{s.get('output_len')} greedy tokens per request; per level {s.get('warmup_rounds')} warm-up "
        f"round, then timed requests {s.get('requests')} (rounds of `concurrency` requests sent at once). "
        "In process: the engine loaded by the benchmark, `EngineRounds` (`kiln bench ENGINE_DIR`). Over "
        "HTTP: `kiln serve ENGINE_DIR` in its own processes (HTTP, engine) on 127.0.0.1, `OpenAIRounds` "
        "(`kiln bench --url`: streaming completions, one SSE event per token, from several client "
        "processes). Levels alternate: in process, then over HTTP.",
        "",
    ]
    engine_points = (r.get("engine") or {}).get("points", [])
    for name, record in (r.get("servers") or {}).items():
        fast = ", ".join(record.get("fast_modules") or []) or "none: h11 + asyncio"
        lines += [
            f"## server `{name}` (httptools/uvloop on its path: {fast}; ready in {record.get('ready_s')} s; "
            f"{record.get('client_processes')} client processes)",
            "",
            *table(engine_points, record["points"]),
            "",
            "| concurrency | output tok/s lost over HTTP | TTFT p50 / p90 / p99 added ms | ITL p50 added ms "
            "| server CPU us/token (HTTP + engine process) |",
            "| --- | --- | --- | --- | --- |",
        ]
        costs = {c["concurrency"]: c for c in record.get("server_cpu", [])}
        for o in (r.get("overhead") or {}).get(name, []):
            cost = costs.get(o["concurrency"], {})
            cpu = (
                f"{cost['front_us_per_token']} + {cost['engine_process_us_per_token']}"
                if cost.get("us_per_token") is not None
                else "-"
            )
            lines.append(
                f"| {o['concurrency']} | {o['tok_s_overhead_pct']}% | {o['ttft_p50_added_ms']} / "
                f"{o['ttft_p90_added_ms']} / {o['ttft_p99_added_ms']} | {o.get('itl_p50_added_ms', '-')} | "
                f"{cpu} |"
            )
        lines += ["", *breakdown_table(record.get("before_first_token") or [])]
        lines += ["", *targets((r.get("overhead") or {}).get(name, []))]
    if engine_points and engine_points[0].get("roofline_pct") is not None:
        lines += [
            "",
            "In process, % of the HBM roofline (median ITL vs weights + KV read per step): "
            + ", ".join(f"c{p['concurrency']} {p['roofline_pct']:.0f}%" for p in engine_points),
        ]
    if r.get("errors"):
        lines += ["", "Skipped / failed stages:", ""] + [
            f"- {k}: {v.splitlines()[0][:300]}" for k, v in r["errors"].items()
        ]
    lines += ["", f"Stages (s): {json.dumps(r.get('stages'))}; total {r.get('total_s')} s."]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets for the server's overhead, judged on this run."""
    top = max(rows, key=lambda o: o["concurrency"], default=None)
    low = min(rows, key=lambda o: o["concurrency"], default=None)
    if top is None:
        return []
    out = [
        "| target | measured | met? |",
        "| --- | --- | --- |",
        f"| output tok/s over HTTP within 10% of in process at concurrency {top['concurrency']} | "
        f"{top['tok_s_overhead_pct']}% lower | {'yes' if top['tok_s_overhead_pct'] < 10 else 'no'} |",
    ]
    for o in [low] + ([top] if top is not low else []):
        added = o["ttft_p50_added_ms"]
        out.append(
            f"| TTFT added under 5 ms (p50, concurrency {o['concurrency']}) | {added} ms | "
            f"{'yes' if added < 5 else 'no'} |"
        )
    return out


if __name__ == "__main__":
    main()
