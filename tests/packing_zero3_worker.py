"""Run by tests/test_packing.py under torchrun with 2 processes: ZeRO-3, fp64, each rank its own
batch. Writes `<out>/rank<r>.txt` with one `case:ok` per case whose packed outputs and reduced
full gradients equal the padded ones within 1e-5."""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from test_packing import assert_all_equal, batches, tiny_llama, weighted_outputs

from halos.train import packing
from halos.train.distributed import close_distributed, init_distributed
from halos.train.logps import CausalLMLogps

DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}


def outputs_and_grads(batch, token_level: bool) -> list[torch.Tensor]:
    module = CausalLMLogps(tiny_llama(), chunk_size=3, token_level=token_level)
    # Partition the fp64 parameters here: left to deepspeed.initialize, DeepSpeed 0.19's
    # zero.Init takes the parameters' dtype as the dtype of *new* tensors and asserts it is
    # half/bf16/float on a CPU whose oneDNN has fp16 (AVX512-FP16), though existing parameters
    # are never cast (partition_parameters.py, _set_dtype and its assertion).
    deepspeed.zero.Init(module=module, config_dict_or_path=DS, dtype=torch.float32)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=DS)
    outs, total = weighted_outputs(engine, batch, engine.device)
    engine.backward(total)
    grads = [safe_get_full_grad(p).clone() for p in engine.module.parameters()]
    assert any(bool(g.abs().sum() > 0) for g in grads), "no gradient reached the parameters"
    return outs + grads


def main(out: Path) -> None:
    packing.MIN_SAVING = -1.0  # pack every batch
    rank, _ = init_distributed()
    lines = []
    for case, kind, token_level in (("paired", "paired", False), ("unpaired", "unpaired", False),
                                    ("tokens", "paired", True)):
        padded, packed = batches(kind, seed=rank)
        assert_all_equal(outputs_and_grads(padded, token_level),
                         outputs_and_grads(packed, token_level))
        lines.append(f"{case}:ok")
    (out / f"rank{rank}.txt").write_text("\n".join(lines) + "\n")
    close_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
