"""Tensor parallelism over ``torch.distributed``: the same code on gloo (CPU) and NCCL (GPUs).

Every rank runs the same program on its ``rank{N}.safetensors`` shard (Megatron layout, as
TensorRT-LLM exports it): column-parallel qkv/fc/gate, row-parallel dense/proj followed by an
all-reduce, a vocab-parallel embedding and lm_head. Rank 0 samples and broadcasts the tokens, so all
ranks stay in lockstep and return the same results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> TensorParallel:
        """The process group this process belongs to (rank 0 of 1 when torch.distributed is not initialised)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's shard along the last dim (vocab-parallel logits)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (sampled token ids)."""
        if self.enabled:
            dist.broadcast(tensor, src=0)
        return tensor
