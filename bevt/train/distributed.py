"""DDP through torchrun: process group set-up (NCCL on GPUs, gloo on CPU), rank helpers, reductions."""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bevt.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            visible = torch.cuda.device_count()
            if local_rank >= visible:  # else a raw "invalid device ordinal" from CUDA
                raise ConfigError(f"this process is local rank {local_rank} of a torchrun job, but {visible} CUDA "
                                  f"GPU(s) are visible: start at most {visible} process(es) per node "
                                  f"(--nproc_per_node), or use the CPU with run.device=cpu (gloo)")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def broadcast_from_rank0(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every process rank 0's parameters and buffers (each process seeds its own initialization)."""
    if info.enabled:
        for t in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(t, src=0)


class AllReduceParallel(torch.nn.Module):
    """Data parallelism with one explicit gradient all-reduce per optimizer step, instead of DDP's hooks.

    For steps replayed from CUDA graphs (``run.cuda_graph`` under torchrun): DDP all-reduces from hooks that
    fire inside every backward, which a graph replay does not run. Here the wrapped module's parameters and
    buffers are broadcast from rank 0 at construction (as DDP does), and the loop calls :meth:`sync_grads`
    after the last micro-step's backward: the gradients are averaged over the processes, in buckets of about
    ``bucket_mb`` MiB. The all-reduce does not overlap the backward (a replayed graph could not overlap it
    anyway). ``no_sync()`` exists so that the loop can treat it like DDP: there is nothing to skip.
    """

    def __init__(self, module: torch.nn.Module, info: DistInfo, bucket_mb: int = 64):
        super().__init__()
        self.module = module
        self.world_size = info.world_size
        self.bucket_bytes = bucket_mb * 2 ** 20
        broadcast_from_rank0(module, info)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        yield

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Average every trainable parameter's gradient over the processes (a missing one counts as zeros)."""
        grads = []
        for p in self.module.parameters():
            if p.requires_grad:
                if p.grad is None:  # every process must send the same buckets
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads + [None]:
            if bucket and (g is None or g.dtype != bucket[0].dtype or size + g.numel() * g.element_size()
                           > self.bucket_bytes):
                flat = torch._utils._flatten_dense_tensors(bucket)
                dist.all_reduce(flat)
                flat /= self.world_size
                for dst, src in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                    dst.copy_(src)
                bucket, size = [], 0
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
