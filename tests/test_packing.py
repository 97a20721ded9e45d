"""Packed, prompt-shared batches give the padded path's log-probs, values and gradients."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig

from halos.config import ConfigError
from halos.data.types import TokenizedCompletion, TokenizedPair
from halos.models.value_head import PolicyValueModel, ValueHeadModel
from halos.train import packing
from halos.train.batching import Batch, collate, make_batch
from halos.train.logps import CausalLMLogps
from halos.train.packing import check_packing, first_fit_decreasing, pack, shared_prompt_units
from halos.train.reference_pass import scoring_order

VOCAB, PAD = 61, 0


@pytest.fixture(autouse=True)
def always_pack(monkeypatch):
    """Pack every batch, even one that packing would not make smaller."""
    monkeypatch.setattr(packing, "MIN_SAVING", -1.0)


def tiny_llama(attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, attn_implementation=attn)
    return LlamaForCausalLM(config).double()


def _ids(rng: torch.Generator, low: int, high: int) -> list[int]:
    n = int(torch.randint(low, high + 1, (1,), generator=rng))
    return torch.randint(1, VOCAB, (n,), generator=rng).tolist()


def pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = torch.Generator().manual_seed(seed)
    return [TokenizedPair(str(i), _ids(rng, 3, 14), _ids(rng, 1, 9), _ids(rng, 1, 9))
            for i in range(n)]


def completions(n: int, seed: int = 0) -> list[TokenizedCompletion]:
    rng = torch.Generator().manual_seed(seed)
    return [TokenizedCompletion(str(i), _ids(rng, 2, 12), _ids(rng, 1, 10), i % 3 != 0)
            for i in range(n)]


def halves(n: int, seed: int = 0) -> list[TokenizedCompletion]:
    """Completions in twos on one prompt, desirable then not: pairs unpaired, as for KTO."""
    examples = completions(n, seed)
    return [TokenizedCompletion(e.id, examples[i - i % 2].prompt_ids, e.completion_ids,
                                i % 2 == 0) for i, e in enumerate(examples)]


def batches(kind: str, seed: int = 0) -> list[Batch]:
    """The padded and the packed batch of the same examples, as the trainer builds them; the
    unpaired one holds two pairs' halves, so its prompts and its KL pairs' are shared."""
    if kind == "paired":
        examples = pairs(5, seed)
        return [make_batch(examples, [4, 0, 2], "paired", PAD, packing=p) for p in (False, True)]
    if kind == "sft":
        return [make_batch(completions(6, seed), [1, 3, 5, 0], "sft", PAD, packing=p)
                for p in (False, True)]
    examples = halves(6, seed)
    partners = [examples[(i + 1) % 6].completion_ids for i in range(6)]
    return [make_batch(examples, [5, 2, 3, 4], "unpaired", PAD, partners, packing=p)
            for p in (False, True)]


def weighted_outputs(forward, batch: Batch, device="cpu") -> tuple[list[torch.Tensor],
                                                                   torch.Tensor]:
    """Every output of `forward` (a wrapper or its DeepSpeed engine) on `batch` and its KL batch
    (without gradient), and a fixed random weighting of the differentiable ones to backpropagate."""
    args, kwargs = batch.engine_inputs(device)
    outs = list(forward(*args, **kwargs))
    if len(outs) == 3:  # (log-probs, mask, values): values count where a token is scored (GAE)
        outs[2] = outs[2] * outs[1]
    if batch.kl is not None:
        with torch.no_grad():
            kl_args, kl_kwargs = batch.kl.engine_inputs(device)
            outs += list(forward(*kl_args, **kl_kwargs))
    generator = torch.Generator().manual_seed(7)
    total = sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype)).sum()
                for o in outs if o.requires_grad)
    return [o.detach() for o in outs], total


def assert_all_equal(want: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    """Floating tensors within 1e-5, integer and boolean ones exactly."""
    for w, g in zip(want, got, strict=True):
        if w.is_floating_point():
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        else:
            assert torch.equal(g, w)


def outputs_and_grads(module: torch.nn.Module, batch: Batch) -> tuple[list[torch.Tensor], list]:
    module.zero_grad()
    outs, total = weighted_outputs(module, batch)
    total.backward()
    return outs, [p.grad.clone() for p in module.parameters() if p.grad is not None]


def assert_same(padded: Batch, packed: Batch, module: torch.nn.Module) -> None:
    want_outs, want_grads = outputs_and_grads(module, padded)
    got_outs, got_grads = outputs_and_grads(module, packed)
    assert len(want_grads) == len(got_grads) > 0
    assert_all_equal(want_outs + want_grads, got_outs + got_grads)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["paired", "unpaired", "sft"])
@pytest.mark.parametrize("token_level", [False, True])
def test_packed_log_probs_and_gradients_equal_padded(attn, kind, token_level):
    padded, packed = batches(kind)
    assert packed.packed is not None and padded.packed is None
    assert torch.equal(packed.input_ids, padded.input_ids)
    if kind != "sft":  # a prompt computed once for each pair, and for each pair's KL partners
        for part in (packed, packed.kl) if kind == "unpaired" else (packed,):
            assert part.packed.tokens <= part.real_tokens - 4
    module = CausalLMLogps(tiny_llama(attn), chunk_size=7, token_level=token_level)
    assert_same(padded, packed, module)


@pytest.mark.parametrize("wrapper", [ValueHeadModel, PolicyValueModel])
def test_packed_value_heads_equal_padded(wrapper):
    padded, packed = batches("paired")
    module = wrapper(tiny_llama()).double()
    if isinstance(module, PolicyValueModel):
        module.chunk_size = 7
    assert_same(padded, packed, module)


def test_a_batch_is_packed_only_where_that_saves_positions(monkeypatch):
    monkeypatch.setattr(packing, "MIN_SAVING", 0.1)
    similar = [([1, 2, 3], [4, 5, 6]), ([7, 8], [9, 10, 11, 12])]  # nothing to share or fill
    assert collate(similar, PAD, "sft", 0, packing=True).packed is None
    assert make_batch(pairs(3), [0, 1, 2], "paired", PAD, packing=True).packed is not None


def test_pairs_compute_each_prompt_once():
    examples = pairs(5)
    packed = make_batch(examples, [0, 1, 2, 3, 4], "paired", PAD, packing=True)
    total = sum(len(e.prompt_ids) * 2 + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    assert packed.real_tokens == total  # the sequences' tokens, as if padded
    assert packed.packed.tokens == total - sum(len(e.prompt_ids) for e in examples)
    assert packed.packed.input_ids.numel() < packed.input_ids.numel()


def test_branches_continue_positions_from_the_prompt_and_never_see_each_other():
    prompt, chosen, rejected = [5, 6, 7], [8, 9], [10, 11, 12]
    packed = pack([(prompt, chosen), (prompt, rejected)], PAD, padded_length=6)
    assert packed.input_ids.tolist() == [prompt + chosen + rejected]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert packed.branch_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    visible = packed.attention_bias(torch.float32)[0, 0] == 0
    assert visible[5].tolist() == [True, True, True, False, False, True, False, False]
    assert visible[4].tolist() == [True, True, True, True, True, False, False, False]
    # Row 1 (the rejected sequence) reads the shared prompt, then its own tokens.
    assert packed.unpack_index[1].tolist() == [0, 1, 2, 5, 6, 7]


def test_units_group_by_prompt_and_bins_fit_the_longest_unit():
    units = shared_prompt_units([([1, 2], [3]), ([], [4]), ([1, 2], [5, 6]), ([], [7]), ([9], [8])])
    assert [(u.prompt, u.responses, u.rows) for u in units] == [
        ([1, 2], [[3], [5, 6]], [0, 2]), ([], [[4]], [1]), ([], [[7]], [3]), ([9], [[8]], [4])]
    assert first_fit_decreasing([5, 1, 1, 2], capacity=5) == [[0], [3, 1, 2]]
    assert first_fit_decreasing([3, 3, 3], capacity=3) == [[0], [1], [2]]


def test_reference_pass_scores_the_sequences_of_one_prompt_together():
    sequences = [([1], [2, 2]), ([3, 3, 3], [4]), ([1], [5]), ([3, 3, 3], [6, 6])]
    assert scoring_order(sequences, packing=False) == [3, 1, 0, 2]
    assert scoring_order(sequences, packing=True) == [1, 3, 0, 2]


def test_reference_batches_share_prompts_and_give_the_padded_grid():
    sequences = [(e.prompt_ids, r) for e in pairs(4, seed=3)
                 for r in (e.chosen_ids, e.rejected_ids)]
    padded, packed = (collate(sequences, PAD, "sft", 0, packing=p) for p in (False, True))
    module = CausalLMLogps(tiny_llama(), chunk_size=5, token_level=True)
    assert packed.packed.tokens < padded.real_tokens
    with torch.no_grad():
        want = module(*padded.engine_inputs("cpu")[0])
        args, kwargs = packed.engine_inputs("cpu")
        got = module(*args, **kwargs)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    assert torch.equal(got[1], want[1])


def test_packing_refuses_what_the_mask_cannot_express():
    with pytest.raises(ConfigError, match="flash-attention-2"):
        check_packing(LlamaConfig(), "flash_attention_2", 512)
    with pytest.raises(ConfigError, match="sliding-window"):
        check_packing(MistralConfig(sliding_window=256), "sdpa", 512)
    check_packing(MistralConfig(sliding_window=4096), "sdpa", 512)
    check_packing(LlamaConfig(), "eager", 512)


@pytest.mark.slow
def test_packed_equals_padded_under_zero3_with_two_processes(tmp_path: Path):
    """Two ranks, ZeRO-3 partitioned fp64 parameters: each rank's packed outputs equal its padded
    ones, and the reduced full gradients too (tests/packing_zero3_worker.py)."""
    worker = Path(__file__).with_name("packing_zero3_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(worker), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        report = (tmp_path / f"rank{rank}.txt").read_text()
        assert report.split() == ["paired:ok", "unpaired:ok", "tokens:ok"], report


def test_every_command_checks_packing_where_it_checks_the_length():
    from halos.config import TrainConfig
    from halos.train.session import check_fits

    cfg = TrainConfig(model="m", data="d", out="o", packing=True,
                      attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="--packing needs --attn-implementation sdpa or eager"):
        check_fits(tiny_llama(), cfg)
    cfg.attn_implementation = "sdpa"
    check_fits(tiny_llama(), cfg)


def test_kto_microbatches_compute_each_pairs_prompt_once(synthetic_data: Path, tiny_model: Path,
                                                         tmp_path: Path) -> None:
    """KTO on paired data with --packing: the step plan keeps a pair's two halves in one
    microbatch, so the policy rows and the KL rows each compute that prompt once."""
    from transformers import AutoTokenizer

    from halos.config import TrainConfig
    from halos.data.convert import pair_of
    from halos.losses import build_loss
    from halos.train.dataview import load_view
    from halos.train.run import step_plan

    cfg = TrainConfig(model=str(tiny_model), data=str(synthetic_data), out=str(tmp_path),
                      loss="kto", packing=True, micro_batch_size=8, max_examples=96)
    view = load_view(cfg, build_loss("kto", {}), AutoTokenizer.from_pretrained(tiny_model),
                     "train")
    micro = [m for step in step_plan(cfg, view, world=1) for m in step]
    together = 0
    for m in micro:
        pairs_of = [pair_of(view.examples[i].id) for i in m]
        both = [i for i, pair in zip(m, pairs_of, strict=True) if pairs_of.count(pair) == 2]
        together += len(both)
        batch, shared = view.batch(m), sum(len(view.examples[i].prompt_ids) for i in both) // 2
        for part in (batch, batch.kl):
            assert part.packed.tokens == part.real_tokens - shared
    # --max-examples 96 cuts 4 halves from their pair (halos.data.convert interleaves them).
    assert together >= len(micro) * 8 - 4
