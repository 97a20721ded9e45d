"""Peak memory per GPU of a training job, and the change that makes a row fit.

    model states   DeepSpeed's own estimators (imported lazily, never re-derived):
                   `estimate_zero3_model_states_mem_needs` for ZeRO-3 (+ offload), and
                   `estimate_zero2_model_states_mem_needs` for ZeRO-1/2 (DeepSpeed ships one
                   estimator for its stage_1_and_2 optimizer) and ZeRO-0 (nothing sharded: the
                   same estimator on one GPU). They are the per-GPU and per-node-CPU figures of
                   the `*_all_cold` tables DeepSpeed prints.
    activations    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
                   Transformer Models", Eq. 2) with fused (SDPA/flash) attention, which stores
                   no s×s scores: 34·s·b·h bytes per layer in 16-bit; with activation
                   checkpointing only each layer's input (2·s·b·h) plus one layer recomputed.
    LM head        the trainer computes log-probs `logits_chunk_size` rows at a time: the
                   chunk's logits in the model's precision plus their fp32 upcast and
                   log-softmax (4 + 4 bytes per entry).
    overhead       CUDA context, NCCL and allocator slack: `RUNTIME_OVERHEAD` per GPU; on a
                   CPU row, the torch and DeepSpeed runtime of the process (`CPU_OVERHEAD`).
    LoRA           (`lora_r` > 0) DeepSpeed's estimators see only the adapters (rank r on every
                   linear projection of each layer, `lora_params`); the frozen base adds its
                   16-bit (fp32 on CPU) weights, sharded under ZeRO-3 like the frozen models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from halos.plan.arch import Arch
from halos.plan.hardware import GiB

DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
RUNTIME_OVERHEAD = 2 * GiB
CPU_OVERHEAD = 1 * GiB
BUFFER_FACTOR = 1.5  # DeepSpeed's default additional_buffer_factor (CPU memory)
STAGES = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]


@dataclass(frozen=True)
class Setup:
    """What decides a training job's memory: the row's parallelism, DeepSpeed config, batch."""

    deepspeed: str
    gpus_per_node: int  # processes per node
    nodes: int
    micro_batch: int  # examples per forward
    sequences_per_example: int  # 2 for pairs (chosen + rejected in one forward)
    max_length: int
    activation_checkpointing: bool
    logits_chunk: int
    bytes_per_value: int = 2  # bf16; 4 for fp32 rows
    on_gpu: bool = True
    models: int = 1  # trained models in the engine (online PPO: policy + value)
    frozen_models: int = 0  # frozen copies beside it (online PPO: reference + reward)
    lora_rank: int = 0  # LoRA adapters on frozen trained models (0 = every weight trains)

    def but(self, **changes) -> Setup:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Memory:
    model_states: int  # per GPU
    activations: int
    lm_head: int
    overhead: int
    cpu_per_node: int  # DeepSpeed's CPU estimate for the node

    @property
    def per_gpu(self) -> int:
        return self.model_states + self.activations + self.lm_head + self.overhead


def zero_config(deepspeed: str) -> tuple[int, bool, bool]:
    """(stage, offload_optimizer, offload_param) of a DeepSpeed config name or JSON path."""
    path = DEEPSPEED_DIR / f"{deepspeed}.json" if not deepspeed.endswith(".json") else Path(deepspeed)
    try:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
    except (OSError, ValueError) as err:
        raise ValueError(f"deepspeed {deepspeed!r}: cannot read {path} ({err})") from err

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") == "cpu"

    return int(zero.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param")


@lru_cache(maxsize=4096)
def deepspeed_model_states(total_params: int, largest_layer_params: int, stage: int,
                           offload_optimizer: bool, offload_param: bool, gpus_per_node: int,
                           nodes: int) -> tuple[int, int]:
    """(bytes per node of CPU memory, bytes per GPU) for the model states, by DeepSpeed."""
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed logs its accelerator choice
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                total_params, largest_layer_params, num_gpus_per_node=gpus_per_node,
                num_nodes=nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_param,
                zero_init=True, additional_buffer_factor=BUFFER_FACTOR)
            return cpu, gpu
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        sharded = stage > 0  # ZeRO-0 replicates everything: the one-GPU figure
        return estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node=gpus_per_node if sharded else 1,
            num_nodes=nodes if sharded else 1, cpu_offload=offload_optimizer,
            additional_buffer_factor=BUFFER_FACTOR)


def activation_bytes(arch: Arch, setup: Setup) -> int:
    s, h = setup.max_length, arch.hidden
    b = setup.micro_batch * setup.sequences_per_example
    per_layer = 34 * s * b * h * setup.bytes_per_value // 2
    if setup.activation_checkpointing:
        kept = 2 * s * b * h * setup.bytes_per_value // 2
        return (arch.layers * kept + per_layer) * setup.models
    return arch.layers * per_layer * setup.models


def lm_head_bytes(arch: Arch, setup: Setup) -> int:
    rows = min(setup.logits_chunk, setup.micro_batch * setup.sequences_per_example * setup.max_length)
    return rows * arch.vocab * (setup.bytes_per_value + 4 + 4)


def lora_params(arch: Arch, rank: int) -> int:
    """Adapter parameters of rank `rank` on every linear projection of each layer: r·(in + out)
    for q, k, v, o (h → h) and gate, up, down (h ↔ intermediate), i.e. r·(11h + 3i) a layer."""
    return rank * (11 * arch.hidden + 3 * arch.intermediate) * arch.layers


def estimate(arch: Arch, setup: Setup) -> Memory:
    """Peak memory per GPU of one training job."""
    stage, off_opt, off_param = zero_config(setup.deepspeed)
    trained = lora_params(arch, setup.lora_rank) if setup.lora_rank else arch.params
    cpu, gpu = deepspeed_model_states(trained * setup.models,
                                      arch.largest_layer_params, stage, off_opt, off_param,
                                      setup.gpus_per_node, setup.nodes)
    # Frozen models (online PPO's reference and reward, a LoRA run's base weights) hold 16-bit
    # weights, sharded by ZeRO-3.
    shards = setup.gpus_per_node * setup.nodes if stage == 3 else 1
    frozen_copies = setup.frozen_models + (setup.models if setup.lora_rank else 0)
    frozen = frozen_copies * arch.params * setup.bytes_per_value // shards
    return Memory(gpu + frozen, activation_bytes(arch, setup), lm_head_bytes(arch, setup),
                  RUNTIME_OVERHEAD if setup.on_gpu else CPU_OVERHEAD, cpu)
