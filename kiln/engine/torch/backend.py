"""``TorchBackend``: TensorRT-LLM checkpoint -> engine dir for a target, and engine dir -> running engine.

An engine dir holds ``rank{N}.safetensors`` in the runtime layout (target dtype, fused/re-quantized
weights), the tokenizer files, ``kiln-engine.json`` (backend, limits, dtype, quant, SM or cpu,
toolchain, model and checkpoint hashes, the layout and the program: Inductor, CUDA graphs and, on CUDA,
the Triton decode kernels with the GEMV chosen per weight shape on the build GPU) and, for CUDA targets, the
Inductor cache of the compiled decode step (``program.inductor-cache``), so a load on the same SM and
toolchain starts warm.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kiln.engine import manifest as engine_manifest
from kiln.engine.base import copy_tokenizer
from kiln.engine.manifest import FORMAT_VERSION, EngineManifest, TorchProgram
from kiln.engine.torch import kernels
from kiln.engine.torch.hf_checkpoint import convert_hf, is_hf_checkpoint, read_hf_spec
from kiln.engine.torch.model import DecoderModel, KVCache, layer_count
from kiln.engine.torch.parallel import TensorParallel, process_layout
from kiln.engine.torch.runtime import TorchEngine
from kiln.engine.torch.spec import ModelSpec, read_spec
from kiln.engine.torch.weights import convert_rank, kv_cache_scales
from kiln.errors import (
    BackendUnavailableError,
    EngineMismatchError,
    ModelSourceError,
    UnsupportedCombinationError,
    disk_full,
)
from kiln.profiles import Target

INDUCTOR_CACHE = "program.inductor-cache"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _toolchain() -> dict[str, str | None]:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {
        "torch": torch.__version__,
        "triton": triton,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def _device_sm(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def default_program(target: Target) -> TorchProgram:
    """The compiled program per device, chosen by measurement (the runs and their numbers are in
    bench/results/: engine_gpu*.md, engine_gpu_profile*.json). On CUDA: the decode step Inductor-compiled
    and replayed as CUDA graphs (the fusion of the norm/RoPE/quantize elementwise ops is what pays; static
    shapes and coordinate-descent tuning did not pay for their compile time) and, with Triton, kiln's own
    decode kernels (``kernels.py``: fused RoPE + cache write + split-KV attention; the batch-1 GEMV per
    weight shape where ``TorchBackend.compile`` measures it faster than cuBLAS). On CPU: eager kernels (no
    CUDA graphs; Inductor's CPU compile costs minutes on small hosts and was not measured to pay)."""
    if target.device == "cuda":
        if kernels.triton:
            return TorchProgram(compile="inductor", cuda_graphs=True, attention="triton")
        return TorchProgram(compile="inductor", cuda_graphs=True)
    return TorchProgram(compile="none", cuda_graphs=False)


class TorchBackend:
    """kiln's portable engine (CPU and CUDA, no TensorRT-LLM needed)."""

    name = "torch"

    def check_available(self, target: Target) -> None:
        if target.backend != "torch":
            raise UnsupportedCombinationError(
                f"target {target.name!r} has backend {target.backend!r}, not torch"
            )
        if target.device != "cuda":
            return
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"target {target.name!r} needs a CUDA GPU ({target.sm}); this machine has "
                "none: run this step on a worker of the target's work pool "
                f"({target.work_pool})"
            )
        found = sorted({_device_sm(torch.device("cuda", i)) for i in range(torch.cuda.device_count())})
        if target.sm not in found:
            raise BackendUnavailableError(
                f"target {target.name!r} is {target.sm}; this machine's GPUs are "
                f"{', '.join(found)}: build on a {target.sm} worker ({target.work_pool})"
            )

    def compile(
        self,
        checkpoint_dir: Path,
        target: Target,
        output_dir: Path,
        lineage: dict,
        *,
        tokenizer_dir: Path | None = None,
        precompile: bool = True,
    ) -> Path:
        """Build ``output_dir`` (replaced atomically) from a TensorRT-LLM checkpoint or a ModelOpt unified HF
        checkpoint (the families ModelOpt exports only that way); see the module doc.

        ``precompile=False`` skips warming Inductor for CUDA targets (the first load then compiles).
        """
        from kiln.hub import hash_directory

        checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
        hf = is_hf_checkpoint(checkpoint_dir)
        if hf:
            spec, family, rope = read_hf_spec(checkpoint_dir, target.limits.max_seq_len)
        else:
            spec = read_spec(checkpoint_dir)
        self._check_fit(spec, target, checkpoint_dir)
        self.check_available(target)
        dtype = DTYPES[target.dtype]
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
        try:
            layouts = []
            layers_per_stage = [0] * spec.pp_size
            # (fp8, N, K) of bf16/FP8 weights, (kind, N, K, group) of integer ones
            gemv_shapes: set[tuple] = set()
            for rank in range(spec.tp_size * spec.pp_size):
                if hf:  # an HF export is one unsharded rank (read_hf_spec gives tp 1 x pp 1)
                    tensors, layout = convert_hf(checkpoint_dir, spec, family, rope, dtype)
                else:
                    tensors, layout = convert_rank(checkpoint_dir, rank, spec, dtype)
                save_file(_unshared(tensors), staging / f"rank{rank}.safetensors")
                layouts.append(layout)
                gemv_shapes |= {
                    (kind == "fp8", *tensors[f"{name}.weight"].shape)
                    for name, kind in layout.items()
                    if kind in ("dense", "fp8") and tensors[f"{name}.weight"].dim() == 2
                }
                gemv_shapes |= {
                    kernels.quant_shape(kind, tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"])
                    for name, kind in layout.items()
                    if kind in kernels.QUANT_KINDS and tensors[f"{name}.weight"].dim() == 2
                }
                layers_per_stage[rank // spec.tp_size] = layer_count(layout)
            if sum(layers_per_stage) != spec.num_layers:
                raise ModelSourceError(
                    f"{checkpoint_dir}: its {spec.pp_size} pipeline stages hold {layers_per_stage} layers, "
                    f"{sum(layers_per_stage)} in all, but config.json says {spec.num_layers}; re-export it"
                )
            tokenizer_source = copy_tokenizer(
                staging,
                [
                    tokenizer_dir,
                    lineage.get("tokenizer_dir"),
                    lineage.get("model_dir"),
                    lineage.get("hf_dir"),
                    checkpoint_dir,
                ],
            )
            manifest = EngineManifest(
                format_version=FORMAT_VERSION,
                backend="torch",
                target=target.name,
                device=target.device,
                sm=target.sm if target.device == "cuda" else None,
                gpu=target.gpu,
                dtype=target.dtype,
                quant_algo=spec.quant_algo,
                kv_cache_quant_algo=spec.kv_cache_quant_algo,
                limits=target.limits,
                toolchain=_toolchain(),
                program=self._program(target, dtype, gemv_shapes),
                model_sha=lineage.get("model_sha") or lineage.get("sha"),
                checkpoint_sha256=hash_directory(checkpoint_dir),
                tokenizer=tokenizer_source,
                lineage=lineage,
                model=spec.to_json(),
                layout=layouts,
            )
            engine_manifest.write(staging, manifest)
            if precompile and target.device == "cuda" and manifest.program.compile == "inductor":
                self._precompile(staging)
            if output_dir.exists():
                shutil.rmtree(output_dir)
            staging.rename(output_dir)
        except BaseException as exc:
            # staging goes in `finally`
            if (full := disk_full("compile", output_dir, exc)) not in (None, exc):
                raise full from exc
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return output_dir

    def load(self, engine_dir: Path, *, program: dict[str, Any] | None = None) -> TorchEngine:
        """Load an engine dir on this machine; ``program`` overrides the built one (benchmarks). A dir fetched
        from the registry is the caller's to verify first (``kiln.registry.fetch.verify_if_fetched``)."""
        engine_dir = Path(engine_dir)
        manifest = engine_manifest.read(engine_dir)
        check_compatible(manifest, engine_dir)
        spec = ModelSpec.from_json(manifest.model)
        world = TensorParallel.current().world_size
        ranks = spec.tp_size * spec.pp_size
        if world != ranks:
            raise EngineMismatchError(
                f"{engine_dir}: engine has tp_size {spec.tp_size} x pp_size {spec.pp_size} = {ranks} "
                f"rank(s) but this process group has {world}: launch one process per rank, e.g. `torchrun "
                f"--nproc-per-node {ranks} ...`"
            )
        tp, pp = process_layout(spec.tp_size, spec.pp_size)
        device = torch.device("cpu")
        if manifest.device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", pp.rank % torch.cuda.device_count()))
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        built = manifest.program.model_dump(exclude_unset=True)
        run = TorchProgram.model_validate({**built, **(program or {})})
        cache_file = engine_dir / INDUCTOR_CACHE
        if run.compile == "inductor" and cache_file.is_file():
            torch.compiler.load_cache_artifacts(cache_file.read_bytes())
        dtype = DTYPES[manifest.dtype]
        tensors = load_file(engine_dir / f"rank{pp.rank}.safetensors")
        scaled_mm = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
        model = DecoderModel(
            spec,
            manifest.layout[pp.rank],
            tensors,
            dtype=dtype,
            device=device,
            tp=tp,
            pp=pp,
            scaled_mm=scaled_mm,
            program=run.model_dump(),
        )
        limits = manifest.limits
        layers = len(model.layers)
        cache = KVCache(
            spec,
            tp,
            layers,
            limits.max_batch_size,
            limits.max_seq_len,
            dtype,
            device,
            kv_cache_scales(spec, tensors, layers),
        )
        return TorchEngine(engine_dir, manifest, model, cache, tp, pp, run)

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _program(target: Target, dtype: torch.dtype, gemv_shapes: set[tuple]) -> TorchProgram:
        """``default_program`` plus, on CUDA with Triton, the GEMV measured fastest per weight shape on this
        GPU and, for integer weights (``linear.tune_quant``), the kernel per row bucket (keys ``int8_wo:NxK``,
        ``int8_sq:NxK``, ``int4_g128:NxK`` -> ``{"m1", "m16", "m64", "large": a config, a named option or
        None}``)."""
        from kiln.engine.torch.linear import tune_quant

        program = default_program(target)
        device = torch.device("cuda", torch.cuda.current_device()) if target.device == "cuda" else None
        if device is None or not kernels.available(device, dtype):
            return program
        dense = {s for s in gemv_shapes if isinstance(s[0], bool)}
        if torch.cuda.get_device_capability(device) < (8, 9):  # no FP8 GEMM: those weights run dequantized
            dense = {s for s in dense if not s[0]}
        integer = {s for s in gemv_shapes if not isinstance(s[0], bool)}
        gemv = {**kernels.tune_gemv(dense, device, dtype), **tune_quant(integer, device, dtype)}
        return TorchProgram.model_validate({**program.model_dump(exclude_unset=True), "gemv": gemv})

    @staticmethod
    def _check_fit(spec: ModelSpec, target: Target, checkpoint_dir: Path) -> None:
        limits = target.limits
        if limits.tp_size != spec.tp_size or limits.pp_size != spec.pp_size:
            raise UnsupportedCombinationError(
                f"{checkpoint_dir}: checkpoint is tp{spec.tp_size}pp{spec.pp_size} but target "
                f"{target.name!r} asks for tp{limits.tp_size}pp{limits.pp_size}: use the checkpoint "
                "exported for that layout"
            )
        if limits.max_seq_len > spec.max_position_embeddings:
            raise UnsupportedCombinationError(
                f"target {target.name!r}: limits.max_seq_len {limits.max_seq_len} exceeds the model's "
                f"max_position_embeddings {spec.max_position_embeddings}: lower limits.max_seq_len"
            )

    def _precompile(self, engine_dir: Path) -> None:
        """Compile the decode step for the common buckets and keep Inductor's artifacts in the engine dir."""
        engine = self.load(engine_dir)
        from kiln.engine.base import GenerationRequest, SamplingParams

        for batch in sorted({1, engine.max_batch_size}):
            requests = [GenerationRequest([1] * 4, SamplingParams(max_new_tokens=4))] * batch
            engine.generate(requests)
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            (engine_dir / INDUCTOR_CACHE).write_bytes(artifacts[0])
        engine.close()


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage (safetensors refuses tied embedding/lm_head views)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def check_compatible(manifest: EngineManifest, engine_dir: Path) -> None:
    """Refuse an engine built for another backend, torch major.minor or GPU SM, naming both sides (``read``
    has refused other formats)."""
    if manifest.backend != "torch":
        raise EngineMismatchError(f"{engine_dir}: built for backend {manifest.backend!r}, not torch")
    built = manifest.toolchain.get("torch")
    if not isinstance(built, str) or _torch_minor(built) != _torch_minor(torch.__version__):
        raise EngineMismatchError(
            f"{engine_dir}: built with torch {built}, this machine has torch {torch.__version__} "
            "(major.minor must match): rebuild the engine here or install that torch"
        )
    if manifest.device != "cuda":
        return
    if not torch.cuda.is_available():
        raise EngineMismatchError(
            f"{engine_dir}: built for CUDA {manifest.sm} ({manifest.gpu}); this "
            "machine has no CUDA GPU: load it on a worker with that GPU"
        )
    here = _device_sm(torch.device("cuda", torch.cuda.current_device()))
    if here != manifest.sm:
        raise EngineMismatchError(
            f"{engine_dir}: built for {manifest.sm} ({manifest.gpu}); this GPU is "
            f"{here} ({torch.cuda.get_device_name()}): rebuild for this target"
        )
