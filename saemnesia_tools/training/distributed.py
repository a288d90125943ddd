# SPDX-License-Identifier: GPL-3.0-or-later
"""Data-parallel scale-out with PyTorch distributed (launched by ``torchrun``; gloo on CPU, NCCL on GPUs).

Training: every rank reads the same seeded global batch and takes its slice; losses are written as the
rank's share of the global-batch loss (global denominators, the BatchTopK threshold of the whole batch) and
gradients are summed across ranks, so a step equals the single-process step on the global batch up to float
summation order. Collection: rank r generates samples r, r+W, ... into its own part; rank 0 then writes
one index over all parts. Statistics: every rank accumulates its slice and the sums are all-reduced.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Who this process is; with ``world_size == 1`` every collective is the identity."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def local_slice(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (ranks must divide it evenly)."""
        if batch_size % self.world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {self.world_size} ranks")
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place across ranks ("sum" or "max"); returns the tensor."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order (no gradient)."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Like `gather`, differentiable: each rank's backward receives the sum of all ranks' gradients
        for its own part, so a loss computed identically on every rank must be divided by world_size."""
        return _GatherWithGrad.apply(tensor, self) if self.active else tensor

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable, small), in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum_gradients(self, params) -> None:
        """All-reduce (sum) the gradients of ``params`` in one flat buffer."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor, dist_ctx: DistContext):
        ctx.dist_ctx, ctx.rows = dist_ctx, tensor.shape[0]
        return dist_ctx.gather(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = ctx.dist_ctx.all_reduce(grad.contiguous().clone())
        start = ctx.dist_ctx.rank * ctx.rows
        return grad[start:start + ctx.rows], None


def finish_distributed() -> None:
    """The end of a successful distributed command: every rank waits for the others, then leaves the group. A rank
    that left while another was still finishing (rank 0 writes the files) could abort in gloo's teardown ("terminate
    called without an active exception"), under load about one run in five."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistContext:
    """The context for this process: from ``torchrun``'s environment (RANK, WORLD_SIZE, LOCAL_RANK), else
    a single process. Initialises the process group (NCCL on CUDA, gloo otherwise) when needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world_size == 1:
        return DistContext(0, 1, dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return DistContext(dist.get_rank(), dist.get_world_size(), dev)
