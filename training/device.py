"""Where a training step runs: the device (--device auto|cpu|cuda) and, under torchrun, the process group.

One `Runtime` answers every "where" question a step asks: which device tensors go to, whether this process is
the one that writes files (rank 0), how a per-rank result becomes the whole split's, and what mixed precision
to use. Outside torchrun it is a world of one and every collective is a no-op, so the same code runs a laptop
CPU, one GPU, or N GPUs on M machines:

    python -m training train --device cuda ...
    torchrun --nproc_per_node=8 -m training train --device cuda ...
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv-endpoint=HOST:29500 -m training train ...

Only APIs present in torch 2.4 and later are used: accelerator machines carry an older torch than the pin.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.checkpoint import StudyError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; 'cuda' without a GPU is a clear error, not a crash later."""
    if name not in DEVICES:
        raise StudyError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise StudyError("--device cuda was asked for, but torch sees no CUDA GPU here "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@contextlib.contextmanager
def full_fp32():
    """cuDNN convolutions in real fp32 for scoring: on Ampere and later they default to TF32, and validation,
    test, calibration and gate figures fitted on a GPU must be those of the fp32 network the CPU handler runs."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def add_device_args(p) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to compute: auto = cuda when a GPU is visible, else cpu")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The one process that writes checkpoints, history, plots and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); plain fp32 on CPU, where bf16 is slower."""
        if self.cuda:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model on this device (channels_last on CUDA: the layout its convolution kernels prefer)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.cuda else model

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel under torchrun (gradients averaged across ranks), the model itself otherwise."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.local_rank] if self.cuda else None)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (decoding images into the shared cache); the others then find it done."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (loss sums, sample counts)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank: decisions made from rank 0's clock (the epoch count of a time budget)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items (the validation split, evaluated once across all ranks)."""
        per = -(-n // self.world)
        return range(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (its shard(n) of a split, in rank order) concatenated, on every rank."""
        if not self.distributed:
            return local
        parts = [None] * self.world
        dist.all_gather_object(parts, local.cpu())
        return torch.cat(parts)

    def average_buffers(self, model: nn.Module) -> None:
        """BatchNorm running statistics averaged across ranks, so every rank validates and rank 0 saves the same
        network (each rank's statistics saw only its own shards)."""
        if not self.distributed:
            return
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(self.world)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto") -> Runtime:
    """This process's Runtime. Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) it joins the process group: nccl on
    GPUs, gloo on CPU; each rank takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN time its kernels once
        return Runtime(dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise StudyError(f"local rank {local_rank} has no GPU: this machine shows {torch.cuda.device_count()}; "
                             "start torchrun with --nproc_per_node at most that")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = True
    if not dist.is_initialized():
        # An hour before a collective gives up: rank 0 may decode the whole dataset while the others wait.
        extra = {"device_id": dev} if dev.type == "cuda" else {}  # binds NCCL to this rank's GPU from the start
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=1), **extra)
    return Runtime(dev, rank, world, local_rank)
