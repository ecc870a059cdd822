"""Where and how tensors are computed: device, autocast precision, and torchrun's process group.

Every stage takes `--device auto|cpu|cuda` and `--precision auto|fp32|bf16|fp16` and resolves them here, so
the rules (bf16 on CPUs only where the hardware has it; fp16 only on CUDA) live in one place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from featx.core.choices import DEVICES, PRECISIONS
from featx.core.errors import FeatxError


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise FeatxError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatxError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return torch.device(device)


CPU_BF16_ENV = "FEATX_CPU_BF16"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively. FEATX_CPU_BF16=1 or 0 overrides the answer, so `auto` resolves
    as on the other kind of CPU: a test suite run both ways catches an exactness check that only holds in one
    precision (on a CPU without it bf16 is emulated: the same rounding, only slower)."""
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise FeatxError(
            f"{CPU_BF16_ENV}={forced}: set it to 1 (auto resolves as on a BF16 CPU), 0 (as on an "
            "AVX2 CPU: fp32) or leave it unset"
        )
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 or AVX): int8 multiply-adds that do not saturate 16-bit sums."""
    try:
        return "vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: assume a CPU of the last years


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. `auto` picks bf16 on CPUs only where the hardware has it:
    elsewhere it is emulated and several times slower than fp32."""
    if precision not in PRECISIONS:
        raise FeatxError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    if precision == "fp16" and device.type == "cpu":
        raise FeatxError("--precision fp16 needs CUDA; on CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@dataclass
class Dist:
    """This process's place in torchrun's world (rank 0 of 1 when not launched by torchrun)."""

    rank: int
    world: int
    device: torch.device

    def sum(self, *values: torch.Tensor) -> list[float]:
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@contextlib.contextmanager
def distributed(device: str) -> Iterator[Dist]:
    """torchrun's environment -> one process group (nccl on GPUs, gloo on CPU); a single process otherwise.
    Each rank uses the GPU of its LOCAL_RANK."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if world == 1 or dist.is_initialized():
        yield Dist(dist.get_rank() if dist.is_initialized() else 0, world, dev)
        return
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield Dist(dist.get_rank(), world, dev)
    finally:
        dist.destroy_process_group()
