"""Tensor and pipeline parallelism over ``torch.distributed``: the same code on gloo (CPU) and NCCL (GPUs).

Ranks are laid out as TensorRT-LLM's ``Mapping`` does: global rank = ``stage * tp_size + tp_rank``, and
``rank{N}.safetensors`` is that rank's shard. Within a stage, tensor parallelism (Megatron layout, as
TensorRT-LLM exports it): column-parallel qkv/fc/gate, row-parallel dense/proj followed by an all-reduce
over the stage's group, a vocab-parallel embedding and lm_head. Between stages, pipeline parallelism:
each stage holds its own slice of the layers (the export numbers them from 0 in every rank file); the
first embeds, the last applies the final norm and lm_head, and hidden states go stage to stage point to
point. The first rank of the last stage samples and broadcasts the tokens, so every rank stays in
lockstep and returns the same results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # this stage's process group; None: the default (whole-world) group

    @classmethod
    def current(cls) -> TensorParallel:
        """The process group this process belongs to (rank 0 of 1 when torch.distributed is not
        initialised)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's shard along the last dim (vocab-parallel logits)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class PipelineParallel:
    """Where this rank sits among the stages, and the point-to-point and broadcast calls between them."""

    stage: int = 0
    stages: int = 1
    tp_size: int = 1
    rank: int = 0  # global rank

    @property
    def enabled(self) -> bool:
        return self.stages > 1

    @property
    def distributed(self) -> bool:
        """More than one rank in all (tensor- or pipeline-parallel)."""
        return self.stages * self.tp_size > 1

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def sampler(self) -> int:
        """The global rank that samples: the first of the last stage (it holds the full logits)."""
        return (self.stages - 1) * self.tp_size

    def send_forward(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.contiguous(), dst=self.rank + self.tp_size)

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        hidden = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(hidden, src=self.rank - self.tp_size)
        return hidden

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sampler's ``tensor`` on every rank (sampled token ids, context logits)."""
        if self.distributed:
            dist.broadcast(tensor, src=self.sampler)
        return tensor


def process_layout(tp_size: int, pp_size: int) -> tuple[TensorParallel, PipelineParallel]:
    """This process's place in a ``tp_size x pp_size`` layout (collective: every rank calls it, in order).

    The caller checks that the process group has ``tp_size * pp_size`` ranks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return TensorParallel(), PipelineParallel()
    rank = dist.get_rank()
    stage, tp_rank = divmod(rank, tp_size)
    group = None
    if tp_size > 1 and pp_size > 1:
        # new_group is collective over the whole world: every rank creates every stage's group
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
        group = groups[stage]
    return TensorParallel(tp_rank, tp_size, group), PipelineParallel(stage, pp_size, tp_size, rank)


def init_from_launcher(device: str) -> bool:
    """Join the process group a launcher such as ``torchrun`` describes (``WORLD_SIZE`` > 1 in the
    environment): NCCL for CUDA engines, gloo on CPU. False when there is none to join or it is joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return True
