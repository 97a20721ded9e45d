"""Run by tests/test_packing.py under torchrun with 2 processes: ZeRO-3, fp64, each rank its own
batch. Writes `<out>/rank<r>.txt` with one `case:ok` per case whose packed outputs and reduced
full gradients equal the padded ones within 1e-5."""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from test_packing import batches, tiny_llama

from halos.train import packing
from halos.train.distributed import init_distributed
from halos.train.logps import CausalLMLogps

DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}


def outputs_and_grads(batch, token_level: bool) -> list[torch.Tensor]:
    module = CausalLMLogps(tiny_llama(), chunk_size=3, token_level=token_level)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=DS)
    args, kwargs = batch.engine_inputs(engine.device)
    outs = list(engine(*args, **kwargs))
    if batch.kl is not None:
        with torch.no_grad():
            kl_args, kl_kwargs = batch.kl.engine_inputs(engine.device)
            outs += list(engine(*kl_args, **kl_kwargs))
    generator = torch.Generator().manual_seed(7)
    total = sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype)).sum()
                for o in outs if o.requires_grad)
    engine.backward(total)
    grads = [safe_get_full_grad(p).clone() for p in engine.module.parameters()]
    assert any(bool(g.abs().sum() > 0) for g in grads), "no gradient reached the parameters"
    return [o.detach() for o in outs] + grads


def main(out: Path) -> None:
    packing.MIN_SAVING = -1.0  # pack every batch
    rank, _ = init_distributed()
    lines = []
    for case, kind, token_level in (("paired", "paired", False), ("unpaired", "unpaired", False),
                                    ("tokens", "paired", True)):
        padded, packed = batches(kind, seed=rank)
        want, got = outputs_and_grads(padded, token_level), outputs_and_grads(packed, token_level)
        for w, g in zip(want, got, strict=True):
            if w.is_floating_point():
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
            else:
                assert torch.equal(g, w), case
        lines.append(f"{case}:ok")
    (out / f"rank{rank}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
