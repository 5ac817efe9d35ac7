"""Where a training step runs: the device (--device auto|cpu|cuda) and, under torchrun, the process group.

One `Runtime` answers every "where" question a step asks: which device tensors go to, whether this process is
the one that writes files (rank 0), how a per-rank result becomes the whole split's, and what mixed precision
to use (--precision auto|fp32|bf16: bf16 autocast where the hardware computes it natively, an Intel CPU with
AMX or AVX512-BF16 or a CUDA GPU; scoring always stays fp32). Outside torchrun it is a world of one and every collective is a no-op, so the same code runs a laptop
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

from training.common.checkpoint import StudyError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# CPU flags (Linux /proc/cpuinfo) under which oneDNN runs bf16 convolutions and matmuls natively: AMX tiles or
# AVX512-BF16. Without them bf16 is emulated and slower than fp32, so 'auto' keeps fp32 there.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


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
    """cuDNN convolutions in real fp32 for scoring: on Ampere and later they default to TF32, and validation, test,
    calibration and dermoscopy check figures fitted on a GPU must be those of the fp32 network the CPU handler runs."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _cpuinfo(key: str) -> list[str]:
    """The values of one /proc/cpuinfo field, one per core; none where it cannot be read (not Linux)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.split(":", 1)[0].strip() == key]


def cpu_flags() -> set[str]:
    """The CPU's feature flags (none known off Linux, so no native bf16 assumed)."""
    return {flag for value in _cpuinfo("flags") for flag in value.split()}


def describe_cpu() -> str:
    """The CPU and its native bf16 flags, for a benchmark's header."""
    flags = sorted(cpu_flags() & set(BF16_CPU_FLAGS))
    return f"{next(iter(_cpuinfo('model name')), 'unknown CPU')}; {', '.join(flags) or 'no AMX / AVX512-BF16'}"


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes bf16 natively (and faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and bool(cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 where native_bf16, else fp32; an explicit bf16 is honoured (emulated bf16 is slow but
    correct), an unknown name is a clear error."""
    if name not in PRECISIONS:
        raise StudyError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def add_device_args(p) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to compute: auto = cuda when a GPU is visible, else cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="training arithmetic: bf16 autocast + channels_last, or fp32; auto = bf16 where the device "
                        "computes it natively (CPU with AMX or AVX512-BF16, CUDA), else fp32. Scoring is always fp32")


@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"  # resolved: "fp32" or "bf16"
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

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def autocast(self):
        """bf16 autocast for the training steps (no loss scaling needed, unlike fp16), on CUDA or on a CPU's
        AMX / AVX512-BF16 units; fp32 otherwise. Validation and every score run outside it, in fp32."""
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model on this device, channels_last (NHWC): the layout cuDNN's and oneDNN's fast convolution
        kernels (AMX included) take without a reorder on every call."""
        return model.to(self.device).to(memory_format=torch.channels_last)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the layout prepare() gave the model."""
        return x.contiguous(memory_format=torch.channels_last)

    def check_precision(self, model: nn.Module, size: int = 32) -> str:
        """One forward pass under autocast; the dtype of its logits, which must be bfloat16 when bf16 was asked
        for. autocast quietly computes in fp32 where it has no bf16 kernels for a device: that would make a
        "bf16" run an fp32 one at a fraction of the expected speed, so it is an error here, not a surprise."""
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.autocast():
            dtype = model(self.layout(torch.zeros(1, 3, size, size, device=self.device))).dtype
        model.train(was_training)
        want = torch.bfloat16 if self.bf16 else torch.float32
        if dtype != want:
            raise StudyError(f"precision {self.precision} was asked for, but a forward pass on {self.device} "
                             f"computed {dtype}: autocast fell back (torch {torch.__version__})")
        return str(dtype).removeprefix("torch.")

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


def setup(device: str = "auto", precision: str = "auto") -> Runtime:
    """This process's Runtime. Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) it joins the process group: nccl on
    GPUs, gloo on CPU; each rank takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN time its kernels once
        return Runtime(dev, resolve_precision(precision, dev))
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
    return Runtime(dev, resolve_precision(precision, dev), rank, world, local_rank)
