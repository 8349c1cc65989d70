"""Checkpoint rank files -> runtime-layout tensors (what an engine dir stores) and back.

The runtime layout is decided once, at build time: tensors cast to the target dtype, W4A8 re-quantized
to FP8, unquantized gate/fc fused into one ``mlp.gate_up`` GEMM, FP8 KV scales per layer. ``layout``
maps each linear to its kind so loading needs no guessing. With pipeline parallelism a rank file holds
its stage's layers only, the embedding on the first stage and ln_f + lm_head on the last.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from kiln.engine.torch.linear import runtime_tensors
from kiln.engine.torch.model import LINEARS
from kiln.engine.torch.spec import ModelSpec
from kiln.errors import ModelSourceError


def convert_rank(
    checkpoint_dir: Path, rank: int, spec: ModelSpec, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read ``rank{rank}.safetensors`` and return (runtime tensors, linear name -> kind)."""
    path = Path(checkpoint_dir) / f"rank{rank}.safetensors"
    source = load_file(path)
    out: dict[str, torch.Tensor] = {}
    layout: dict[str, str] = {}

    def take(name: str) -> torch.Tensor:
        if name not in source:
            raise ModelSourceError(
                f"{path}: missing tensor {name!r}; is this a {spec.architecture} checkpoint "
                "exported by ModelOpt export_tensorrt_llm_checkpoint?"
            )
        return source[name]

    def add_linear(name: str, quant_algo: str | None) -> None:
        take(f"{name}.weight")
        try:
            kind, tensors = runtime_tensors(name, source, quant_algo, dtype)
        except (KeyError, ValueError) as exc:
            raise ModelSourceError(f"{path}: {exc}") from None
        layout[name] = kind
        out.update({f"{name}.{field}": t for field, t in tensors.items()})

    stage = rank // spec.tp_size
    if stage == 0:
        out["transformer.vocab_embedding.weight"] = take("transformer.vocab_embedding.weight").to(dtype)
    if stage == spec.pp_size - 1:
        out["transformer.ln_f.weight"] = take("transformer.ln_f.weight").to(dtype)
        lm_head = "lm_head" if "lm_head.weight" in source else "transformer.vocab_embedding"
        add_linear(lm_head, spec.quant_algo)
        if lm_head != "lm_head":  # tied embeddings without an exported lm_head
            out["lm_head.weight"] = out.pop(f"{lm_head}.weight")
            layout["lm_head"] = layout.pop(lm_head)
    for i in range(stage_layers(source, spec, path)):
        base = f"transformer.layers.{i}"
        for norm in ("input_layernorm", "post_layernorm"):
            out[f"{base}.{norm}.weight"] = take(f"{base}.{norm}.weight").to(dtype)
        if spec.qk_norm:  # Qwen3: ModelOpt's export names its per-head q/k RMSNorms so
            for norm in ("q_layernorm", "k_layernorm"):
                out[f"{base}.attention.{norm}.weight"] = take(f"{base}.attention.{norm}.weight").to(dtype)
        for name in LINEARS:
            add_linear(f"{base}.{name}", spec.quant_algo)
        fuse_rows(
            [f"{base}.mlp.fc", f"{base}.mlp.gate"], f"{base}.mlp.gate_up", out, layout, ("dense", "fp8")
        )
        if spec.kv_cache_quant_algo:
            for which in ("k", "v"):
                scale = source.get(f"{base}.attention.{which}_cache_scaling_factor")
                if scale is None:
                    scale = take(f"{base}.attention.kv_cache_scaling_factor")
                out[f"{base}.attention.{which}_cache_scale"] = scale.float().reshape(())
    return out, layout


def stage_layers(tensors: dict[str, torch.Tensor], spec: ModelSpec, path: Path) -> int:
    """How many decoder layers a rank file holds: all of them at pp 1; with pipeline parallelism the
    export writes each stage's slice numbered from 0 (``transformer.layers.0..k-1``)."""
    found = {int(name.split(".")[2]) for name in tensors if name.startswith("transformer.layers.")}
    count = len(found)
    if found != set(range(count)) or (spec.pp_size == 1 and count != spec.num_layers):
        raise ModelSourceError(
            f"{path}: holds decoder layers {sorted(found)[:8]}..., expected 0..{spec.num_layers - 1} "
            f"of {spec.num_layers} (pp_size {spec.pp_size}); re-export the checkpoint"
        )
    return count


def fuse_rows(
    parts: list[str],
    fused: str,
    tensors: dict[str, torch.Tensor],
    layout: dict[str, str],
    kinds: tuple[str, ...],
) -> bool:
    """Concatenate linears that read the same input into one GEMM (``fused``) where that is exact: the same
    kind (one of ``kinds``), per-row tensors (weights, biases, per-channel or per-group scales) stacked, and
    every shared tensor (per-tensor scales, pre-quant scales) equal across the parts, as ModelOpt's
    TensorRT-LLM export makes them for fused layers (``preprocess_linear_fusion``). Otherwise nothing
    changes."""
    kind = layout[parts[0]]
    if kind not in kinds or any(layout[p] != kind for p in parts):
        return False
    fields = [{k[len(p) + 1 :] for k in tensors if k.startswith(f"{p}.")} for p in parts]
    if any(f != fields[0] for f in fields):
        return False
    merged = {}
    for field in fields[0]:
        values = [tensors[f"{p}.{field}"] for p in parts]
        if field in ("weight", "bias") or (field == "weight_scale" and values[0].dim() > 0):
            merged[field] = torch.cat(values)
        elif all(torch.equal(values[0], v) for v in values[1:]):
            merged[field] = values[0]
        else:
            return False
    for p in parts:
        for field in fields[0]:
            del tensors[f"{p}.{field}"]
        del layout[p]
    tensors.update({f"{fused}.{field}": t for field, t in merged.items()})
    layout[fused] = kind
    return True


def kv_cache_scales(
    spec: ModelSpec, tensors: dict[str, torch.Tensor], num_layers: int
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per local layer (K scale, V scale) of an FP8 KV cache, or None for an unquantized cache."""
    if not spec.kv_cache_quant_algo:
        return None
    return [
        (
            tensors[f"transformer.layers.{i}.attention.k_cache_scale"],
            tensors[f"transformer.layers.{i}.attention.v_cache_scale"],
        )
        for i in range(num_layers)
    ]
