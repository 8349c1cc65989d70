"""Linear layers for each quant algo: checkpoint tensors -> runtime layout -> matmul.

The numerics follow ModelOpt's fake-quant model (what the checkpoint was calibrated and checked as):
activations are quantized per tensor with the calibrated ``activation_scaling_factor`` after the
AWQ/SmoothQuant ``pre_quant_scale``; weights dequantize as ``q * scale`` in float32. FP8 runs as a real
FP8 GEMM (``torch._scaled_mm``) on CUDA SM >= 89 and is dequantized elsewhere.

Activations quantize in float32 as ``round(x * (1 / scale))``, ModelOpt's fake-quant order: in a
bf16 engine ``x / scale`` would round to bf16 before the FP8/int8 rounding (a double rounding), and
``x / scale`` vs ``x * (1 / scale)`` differ by one float ulp, which moves a value sitting on a rounding
midpoint one quantization step.

On CUDA (and under Triton's interpreter in tests) the integer kinds run ``kernels.qmatmul`` where the
engine's ``program.gemv`` names a kernel for the weight's shape and the row count (``tune_quant``, at
build time): the Triton kernels read the int8/int4 weights as stored at any row count (split-K where a
decode batch's grid would leave SMs idle, M tiles above 16 rows). SmoothQuant above 16 rows may run
``torch._int_mm`` (int8 x int8 -> int32, cuBLAS; it takes more than 16 rows). int4 may also run torch's
tinygemm (``kernels.int4pack_mm``, the packed copy made once at load) at any row count, and the
weight-only kinds above 16 rows may dequantize in one Triton pass before cuBLAS (``kernels.dequantize``);
a row bucket no kernel serves dequantizes the weight in each call, as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.engine.torch import kernels
from kiln.engine.torch.fused import on_cuda
from kiln.engine.torch.kernels import FP8_MAX

KINDS = ("dense", "fp8", "int8_sq", "int8_wo", "int4")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's ``[out/2, in]`` int4 packing (low nibble = even output row) -> int8 ``[out, in]``."""
    low = (packed << 4) >> 4  # arithmetic shifts sign-extend each nibble
    high = packed >> 4
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@on_cuda
def _fp8_quantize(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """An FP8 activation quantizer's forward (``x / scale`` rounded to e4m3): one kernel on CUDA."""
    return _fp8_round(x.float() * inv_scale)


def runtime_tensors(
    name: str, tensors: dict[str, torch.Tensor], quant_algo: str | None, dtype: torch.dtype
) -> tuple[str, dict[str, torch.Tensor]]:
    """Convert one checkpoint linear (``name.weight`` + scales) into (kind, runtime tensors).

    W4A8-AWQ becomes an FP8 linear here (its int4 x group scale weights, re-quantized to FP8 with
    ``weights_scaling_factor_2``, are exactly what its fake-quant model computes with), so one FP8 GEMM
    path serves both.
    """
    weight = tensors[f"{name}.weight"]
    get = tensors.get
    out: dict[str, torch.Tensor] = {}
    if (bias := get(f"{name}.bias")) is not None:
        out["bias"] = bias.to(dtype)
    if (pqs := get(f"{name}.prequant_scaling_factor")) is not None:
        out["pre_quant_scale"] = pqs.to(dtype)
    weight_scale = get(f"{name}.weights_scaling_factor")
    input_scale = get(f"{name}.activation_scaling_factor")
    if weight.is_floating_point() and weight.dtype != torch.float8_e4m3fn:
        return "dense", {**out, "weight": weight.to(dtype)}
    if weight_scale is None:
        raise ValueError(f"{name}.weight is {weight.dtype} but {name}.weights_scaling_factor is missing")
    if quant_algo == "FP8":
        return "fp8", {
            **out,
            "weight": weight.view(torch.float8_e4m3fn),
            "weight_scale": weight_scale.float().reshape(()),
            "input_scale": input_scale.float().reshape(()),
        }
    if quant_algo == "W8A8_SQ_PER_CHANNEL":
        return "int8_sq", {
            **out,
            "weight": weight,
            "weight_scale": weight_scale.float(),
            "input_scale": input_scale.float().reshape(()),
        }
    if quant_algo == "W8A16":
        return "int8_wo", {**out, "weight": weight, "weight_scale": weight_scale.float()}
    if quant_algo in ("W4A16", "W4A16_AWQ"):
        return "int4", {**out, "weight": weight.view(torch.int8), "weight_scale": weight_scale.float()}
    if quant_algo == "W4A8_AWQ":
        scale2 = tensors[f"{name}.weights_scaling_factor_2"].float().reshape(())
        q = unpack_int4(weight.view(torch.int8)).float()
        group = q.shape[1] // weight_scale.shape[1]
        dequant = q * weight_scale.float().repeat_interleave(group, dim=1)
        return "fp8", {
            **out,
            "weight": _fp8_round(dequant / scale2),
            "weight_scale": scale2,
            "input_scale": input_scale.float().reshape(()),
        }
    raise ValueError(f"{name}: quant_algo {quant_algo!r} has no runtime layout")


class QuantLinear(nn.Module):
    """``y = reduce(x @ W^T) + b`` for one runtime kind; ``reduce`` is the tensor-parallel all-reduce of
    row-parallel layers."""

    def __init__(
        self,
        kind: str,
        tensors: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype,
        device: torch.device,
        scaled_mm: bool,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        gemv: dict[str, list[int] | None] | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown linear kind {kind!r}; known: {', '.join(KINDS)}")
        self.kind, self.dtype, self.reduce = kind, dtype, reduce
        self.bias = tensors["bias"].to(device) if "bias" in tensors else None
        self.pre_quant_scale = tensors["pre_quant_scale"].to(device) if "pre_quant_scale" in tensors else None
        self.input_scale = tensors["input_scale"].to(device) if "input_scale" in tensors else None
        self.inv_input_scale = None if self.input_scale is None else 1.0 / self.input_scale
        weight, scale = tensors["weight"], tensors.get("weight_scale")
        self.scaled_mm = kind == "fp8" and scaled_mm
        # integer weights: the kernels the build chose for this shape per row bucket (``_option``); one that
        # cannot run here (no Triton, not CUDA) leaves its bucket on the torch path
        self.quant = None
        self.int4pack = self.int4_scales_zeros = None
        if gemv and kind in kernels.QUANT_KINDS:
            shape = kernels.quant_shape(kind, weight, scale)
            choice = {
                bucket: option if _servable(option, shape, device, dtype) else None
                for bucket, option in (gemv.get(kernels.quant_key(*shape)) or {}).items()
            }
            self.quant = choice if any(choice.values()) else None
        if kind == "dense" or self.scaled_mm:
            self.weight, self.weight_scale = weight.to(device), None if scale is None else scale.to(device)
        elif self.quant is None and (device.type == "cpu" or kind == "fp8"):
            # No integer/FP8 GEMM here: dequantize once at load; activation quantization is still applied.
            self.weight, self.weight_scale = self._dequantize(weight, scale).to(device), None
        else:
            self.weight, self.weight_scale = weight.to(device), scale.to(device)
            if kind == "int4" and self.quant is not None and kernels.TINYGEMM in self.quant.values():
                self.group = weight.shape[1] // scale.shape[1]
                self.int4pack, self.int4_scales_zeros = kernels.int4pack(
                    self.weight, self.weight_scale, dtype
                )
                if all(self.quant.get(b) == kernels.TINYGEMM for b in INT4_BUCKETS):
                    # tinygemm serves every row count: one copy in memory
                    self.weight = self.weight_scale = None
            if kind == "int4" and self.quant is not None and self.weight_scale is not None:
                # group-major storage of the same [out, in/group] scales: a kernel's rows read adjacent floats
                self.weight_scale = self.weight_scale.t().contiguous().t()
        # batch-1 rows go to the Triton GEMV where the build measured it faster than cuBLAS for this shape
        self.gemv = None
        if gemv and (kind == "dense" or self.scaled_mm) and kernels.available(device, dtype):
            self.gemv = gemv.get(kernels.gemv_key(self.scaled_mm, *self.weight.shape))
        self.out_scale = None
        if (self.gemv and self.scaled_mm) or (self.quant is not None and kind == "int8_sq"):
            # FP8: a scalar; int8_sq: per output channel
            self.out_scale = self.input_scale * self.weight_scale

    def _dequantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp8":
            return (weight.float() * scale).to(self.dtype)
        if self.kind == "int4":
            q = unpack_int4(weight).float()
            return (q * scale.repeat_interleave(q.shape[1] // scale.shape[1], dim=1)).to(self.dtype)
        return (weight.float() * scale[:, None]).to(self.dtype)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp8":
            q = _fp8_quantize(x, self.inv_input_scale)
            return q if self.scaled_mm else (q.float() * self.input_scale).to(self.dtype)
        # int8_sq: scale = amax/127 but the full int8 range -128..127, exactly as ModelOpt's fake quant
        return (torch.round(x.float() * self.inv_input_scale).clamp_(-128, 127) * self.input_scale).to(
            self.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self._matmul(x))

    def fp8_input_scale(self) -> torch.Tensor | None:
        """The ``inv_input_scale`` an already-quantized input of ``forward_quantized`` must use, where this
        layer's GEMM can take one (FP8 on ``_scaled_mm``, no pre-quant scale); else None."""
        if self.kind == "fp8" and self.scaled_mm and self.pre_quant_scale is None:
            return self.inv_input_scale
        return None

    def forward_quantized(self, xq: torch.Tensor) -> torch.Tensor:
        """``forward`` of an input the caller quantized with ``fp8_input_scale`` (fused into the op that
        made it: one pass fewer over the activations)."""
        return self._finish(self._fp8_gemm(xq))

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            y = self.reduce(y)
        return y if self.bias is None else y + self.bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None and x.dim() == 2 and x.shape[0] == 1:
            return kernels.gemv(
                x, self.weight, self.pre_quant_scale, self.inv_input_scale, self.out_scale, self.gemv
            )
        # tinygemm only: rows of any shape
        if self.quant is not None and x.dim() != 2 and self.weight is None:
            return self._matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        if self.quant is not None and x.dim() == 2:
            option = self._option(x.shape[0])
            if isinstance(option, list):
                scale = self.out_scale if self.kind == "int8_sq" else self.weight_scale
                return kernels.qmatmul(
                    x, self.weight, scale, self.pre_quant_scale, self.inv_input_scale, self.kind, option
                )
            if option == kernels.INT_MM:
                return self._int8_gemm(x)
            if option == kernels.FUSED:
                scale = self.out_scale if self.kind == "int8_sq" else self.weight_scale
                return kernels.fused_gemv(
                    x, self.weight, scale, self.pre_quant_scale, self.inv_input_scale, self.kind
                )
            if option is not None:
                # AWQ's pre-quant scale as its own multiply: Inductor fuses it into the op that made x
                if self.pre_quant_scale is not None:
                    x = x * self.pre_quant_scale
                if option == kernels.TINYGEMM:
                    return kernels.int4pack_mm(x, self.int4pack, self.group, self.int4_scales_zeros)
                return F.linear(x, kernels.dequantize(self.weight, self.weight_scale, self.dtype))
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.kind in ("fp8", "int8_sq"):
            x = self._quantize_input(x)
        if self.scaled_mm:
            return self._fp8_gemm(x)
        if self.weight_scale is None:
            return F.linear(x, self.weight)
        return F.linear(x, self._dequantize(self.weight, self.weight_scale))

    def _option(self, rows: int) -> list[int] | str | None:
        """The build's choice for ``rows`` activation rows: ``m1``, ``m16`` (2-16), ``m64`` (17-64, where the
        build tuned it: engines built before it for the int8 kinds have ``large`` serve these rows too) and
        ``large`` (the rest)."""
        if rows == 1:
            return self.quant.get("m1")
        if rows <= kernels.QMM_BLOCK_M:
            return self.quant.get("m16")
        if rows <= TUNE_ROWS["m64"] and "m64" in self.quant:
            return self.quant["m64"]
        return self.quant.get("large")

    def read_bytes(self, rows: int = 1) -> int:
        """Bytes of the tensors a call with ``rows`` rows reads (the weight copy its kernel uses, scales,
        bias)."""
        option = self._option(rows) if self.quant is not None else None
        if option == kernels.TINYGEMM:
            tensors = [self.int4pack, self.int4_scales_zeros]
        else:
            tensors = [self.weight, self.weight_scale]
            if self.kind == "int8_sq" and self.quant is not None:
                tensors[1] = self.out_scale
        tensors += [self.bias, self.pre_quant_scale]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _int8_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """SmoothQuant as a real int8 GEMM (more than 16 rows: ``torch._int_mm``'s rule on CUDA): activations
        quantized exactly as ``_quantize_input``, int32 accumulation, then input x weight scale per column."""
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        q = torch.round(x.float() * self.inv_input_scale).clamp_(-128, 127).to(torch.int8)
        return (torch._int_mm(q, self.weight.t()).float() * self.out_scale).to(self.dtype)

    def _fp8_gemm(self, xq: torch.Tensor) -> torch.Tensor:
        lead, k = xq.shape[:-1], xq.shape[-1]
        y = torch._scaled_mm(
            xq.reshape(-1, k),
            self.weight.t(),
            scale_a=self.input_scale,
            scale_b=self.weight_scale,
            out_dtype=self.dtype,
        )
        return y.reshape(*lead, -1)


# -- build-time choice of the integer-weight kernels per weight shape ---------------------------------------

# the rows each bucket is timed at: m1 one row, m16 2-16, m64 17-64, large the rest (a prefill)
TUNE_ROWS = {"m1": 1, "m16": kernels.QMM_BLOCK_M, "m64": 64, "large": 512}
INT4_BUCKETS = ("m1", "m16", "m64", "large")
TUNE_MAX_ERR = 2e-2  # a candidate further than this from the torch path (of the output range) is never chosen
_TUNED: dict[tuple, dict] = {}  # (kind, N, K, group, device, dtype) -> times: one race per shape per process


def _servable(
    option: list[int] | str | None, shape: tuple[str, int, int, int], device: torch.device, dtype: torch.dtype
) -> bool:
    """Whether ``option`` (a ``program.gemv`` entry) runs here; one that does not falls back to the torch
    path."""
    if option is None:
        return False
    if option == kernels.TINYGEMM:
        return kernels.tinygemm_available(device, dtype) and kernels.tinygemm_fits(*shape[1:])
    if option == kernels.FUSED and device.type == "cpu":
        # its eager math, what the tests check; Inductor compiles it on CUDA only
        return kernels.interpreting()
    return kernels.available(device, dtype)


def tune_quant(
    shapes: set[tuple[str, int, int, int]],
    device: torch.device,
    dtype: torch.dtype,
    report: dict | None = None,
) -> dict[str, dict[str, list[int] | str | None]]:
    """For each integer-weight shape ``(kind, N, K, group)`` (``kernels.quant_shape``): the fastest way to
    run one row (``m1``), 2-16 rows (``m16``), 17-64 (``m64``) and the rest (``large``), each timed at its
    ``TUNE_ROWS``: a ``kernels.qmatmul`` config (``kernels.quant_config``: split-K, M tiles), a named
    option (``kernels.TINYGEMM``, ``FUSED``, ``DEQUANT``, ``INT_MM``) or ``None`` for the torch path
    (dequantize, then cuBLAS). Each candidate runs through ``QuantLinear`` itself, is checked against the
    torch path's output first (a wrong compile is never chosen) and timed as a chain over enough distinct
    weights that none stays in L2, as a decode step reads them. A shape raced once in this process is not
    raced again. ``report``: filled with every time (ms) and rejection."""
    chosen: dict[str, dict[str, list[int] | str | None]] = {}
    for kind, n, k, group in sorted(shapes):
        key = kernels.quant_key(kind, n, k, group)
        memo = (kind, n, k, group, str(device), dtype)
        if memo not in _TUNED:
            _TUNED[memo] = _time_quant(kind, n, k, group, device, dtype)
        times = _TUNED[memo]
        choice: dict[str, list[int] | str | None] = {}
        for bucket, options in times.items():
            if bucket == "meta":
                continue
            timed = {label: ms for label, (_, ms) in options.items() if isinstance(ms, float)}
            best = min(timed, key=timed.get)
            choice[bucket] = options[best][0]
        chosen[key] = choice
        if report is not None:
            report[key] = {
                **times["meta"],
                **{b: {label: ms for label, (_, ms) in o.items()} for b, o in times.items() if b != "meta"},
                "chosen": choice,
            }
    return chosen


def _label(option: list[int] | str | None) -> str:
    if option is None or isinstance(option, str):
        return option or "torch"
    design, block_n, block_k, warps, stages, split_k, block_m = kernels.quant_config(option)
    label = ("gemv:" if design == kernels.GEMV else "qmm:") + f"{block_n}x{block_k}x{warps}x{stages}"
    return label + (f"/k{split_k}" if split_k > 1 else "") + (f"/m{block_m}" if len(option) > 6 else "")


def _random_quant(kind: str, n: int, k: int, group: int, device: torch.device) -> dict[str, torch.Tensor]:
    if kind == "int4":
        weight = torch.randint(-128, 128, (n // 2, k), dtype=torch.int8, device=device)
        scale = torch.rand(n, k // group, device=device) * 1e-2 + 1e-3
    else:
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        scale = torch.rand(n, device=device) * 1e-3 + 1e-4
    tensors = {"weight": weight, "weight_scale": scale}
    if kind == "int8_sq":
        tensors["input_scale"] = torch.tensor(0.02, device=device)
    return tensors


def _buckets(
    kind: str, n: int, k: int, group: int, device: torch.device, dtype: torch.dtype
) -> dict[str, list]:
    """The options raced per row bucket for one shape (the torch path, ``None``, first: the reference)."""
    shape = (kind, n, k, group)
    extra = [o for o in (kernels.TINYGEMM,) if kind == "int4" and _servable(o, shape, device, dtype)]
    # Inductor-fused GEMV for the int8 kinds (int4 has tinygemm): one compile per shape at build time
    fused = [kernels.FUSED] if device.type == "cuda" and kind != "int4" else []
    sms = kernels.sm_count(device)

    def configs(bucket: str) -> list[list[int]]:
        return kernels.quant_candidates(kind, k, group, TUNE_ROWS[bucket], n, sms)

    if kind == "int8_sq" and n % 8 == 0 and k % 8 == 0:
        whole = [kernels.INT_MM]
    else:
        whole = [*extra, kernels.DEQUANT] if kind == "int4" else [kernels.DEQUANT]
    # above 16 rows the M-tiled Triton kernel races the whole-weight GEMMs: the measurement decides
    return {
        "m1": [None, *configs("m1"), *extra, *fused],
        "m16": [None, *configs("m16"), *extra],
        "m64": [None, *whole, *configs("m64")],
        "large": [None, *whole, *configs("large")],
    }


def _time_quant(kind: str, n: int, k: int, group: int, device: torch.device, dtype: torch.dtype) -> dict:
    """{bucket: {label: (option, ms or the reason it was not timed)}, "meta": {...}}."""
    key = kernels.quant_key(kind, n, k, group)
    weight_bytes = (n // 2 if kind == "int4" else n) * k + (n * (k // group) if kind == "int4" else n) * 4
    copies = max(2, min(16, (256 << 20) // weight_bytes))
    weights = [_random_quant(kind, n, k, group, device) for _ in range(copies)]
    out: dict = {
        "meta": {"kind": kind, "n": n, "k": k, "group": group, "bytes": weight_bytes, "copies": copies}
    }
    for bucket, options in _buckets(kind, n, k, group, device, dtype).items():
        x = torch.randn(TUNE_ROWS[bucket], k, device=device, dtype=dtype)
        reference = None
        timed = out[bucket] = {}
        for option in options:
            program = None if option is None else {key: {bucket: option}}
            try:
                layers = [
                    QuantLinear(kind, t, dtype=dtype, device=device, scaled_mm=False, gemv=program)
                    for t in weights
                ]
                y = layers[0](x).float()
                if reference is None:
                    reference = y
                err = ((y - reference).abs().max() / reference.abs().max()).item()
                if not err <= TUNE_MAX_ERR:  # NaN fails too
                    timed[_label(option)] = (option, f"off the torch path by {err:.2e} of the output range")
                    continue
                timed[_label(option)] = (
                    option,
                    kernels._chain_ms(lambda i, layers=layers, x=x: layers[i](x), copies),
                )
            except Exception as exc:  # a candidate that does not compile on this GPU is left out
                timed[_label(option)] = (option, f"{type(exc).__name__}: {exc}"[:300])
            finally:
                layers = None
    return out
