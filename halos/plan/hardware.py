"""The figures a plan assumes about the hardware, stated once (override with `halos plan
--gpu NAME --mfu X`).

Peak dense bf16 tensor-core FLOP/s from the vendors' data sheets (no sparsity); CPU rows
(gpus: 0) are fp32 on the cores their row asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # per device, FLOP/s
    memory_bytes: int  # per device

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GiB


GPUS = {
    "a100-40gb": Device("a100-40gb", 312e12, 40 * GiB),
    "a100": Device("a100", 312e12, 80 * GiB),
    "h100": Device("h100", 989e12, 80 * GiB),
    "h200": Device("h200", 989e12, 141 * GiB),
}
DEFAULT_GPU = "a100"  # Archangel's rows: 80 GB A100 nodes
# Model FLOPs utilization: the fraction of peak a well-tuned DeepSpeed job reaches on GPUs
# (30-50% is typical for ZeRO-2/3 at these sizes); tiny CPU models reach far less.
DEFAULT_MFU = 0.4
CPU_CORE_FLOPS = 1e11  # one AVX2/AVX-512 core, fp32 FMA at ~3 GHz
# Tiny models on CPU: the micro suite's training jobs (tests/suites/micro.yaml) measured
# 0.25-1.1 of the plan at 0.05 on a 2-core machine, process start-up included: 0.2 centres it.
CPU_MFU = 0.2


def gpu_device(name: str | None) -> Device:
    """A GPU type by name (a row's `gpu_model`, or --gpu); ValueError naming the known ones."""
    key = (name or DEFAULT_GPU).lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU type {name!r}; known: {', '.join(sorted(GPUS))} "
                         f"(pass --gpu NAME to halos plan)")
    return GPUS[key]


def cpu_device(cores: int, memory_mb: int) -> Device:
    """A CPU row's processes share `cores` cores and the row's memory."""
    return Device(f"cpu×{cores}", CPU_CORE_FLOPS * cores, memory_mb * 2**20)
