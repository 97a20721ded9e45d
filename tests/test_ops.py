"""The chunked, response-only LM head equals the naive full-logits computation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from halos.train.logps import CausalLMLogps, chunked_target_logps, naive_sequence_logps


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(config).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    input_ids = torch.randint(0, 97, (4, 23))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 15:] = 0  # right padding
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[0, 5:] = True
    loss_mask[1, 20:] = True
    loss_mask[2, 9:15] = True
    loss_mask[3, 1:] = True
    return input_ids, attention_mask, loss_mask


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_chunked_logps_equal_naive_values_and_gradients(chunk_size: int) -> None:
    model = _model()
    input_ids, attention_mask, loss_mask = _batch()
    weights = torch.randn(4, dtype=torch.float64)

    sums, tokens = CausalLMLogps(model, chunk_size)(input_ids, attention_mask, loss_mask)
    (sums * weights).sum().backward()
    chunked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    naive = naive_sequence_logps(logits, input_ids, loss_mask)
    (naive.sums * weights).sum().backward()

    torch.testing.assert_close(sums.double(), naive.sums, atol=1e-5, rtol=0)
    assert tokens.tolist() == naive.tokens.tolist() == [18, 3, 6, 22]
    for got, want in zip(chunked_grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_token_level_grid_is_the_naive_per_token_log_probs() -> None:
    model = _model()
    input_ids, attention_mask, loss_mask = _batch()
    with torch.no_grad():
        grid, mask = CausalLMLogps(model, 7, token_level=True)(input_ids, attention_mask, loss_mask)
        sums, tokens = CausalLMLogps(model, 7)(input_ids, attention_mask, loss_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    naive = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    assert grid.shape == mask.shape == (4, 22) and torch.equal(mask, loss_mask[:, 1:])
    torch.testing.assert_close(grid, naive * mask, atol=1e-10, rtol=0)
    torch.testing.assert_close(grid.sum(-1), sums, atol=0, rtol=0)
    assert mask.sum(-1).tolist() == tokens.tolist()


def test_chunks_never_hold_more_than_chunk_rows_of_logits() -> None:
    seen: list[tuple[int, ...]] = []
    head = torch.nn.Linear(8, 50, bias=False)
    head.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    hidden = torch.randn(37, 8, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    chunked_target_logps(hidden, targets, head, chunk_size=10).sum().backward()
    assert seen and max(rows for rows, _ in seen) == 10  # forward and recomputation alike


def test_prompt_positions_do_not_reach_the_lm_head() -> None:
    model = _model()
    input_ids, attention_mask, loss_mask = _batch()
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].shape[0]))
    with torch.no_grad():
        CausalLMLogps(model, chunk_size=4096)(input_ids, attention_mask, loss_mask)
    assert rows == [int(loss_mask[:, 1:].sum())]  # 49 scored positions, not 4 × 23


def test_bad_chunk_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="chunk size"):
        chunked_target_logps(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                             torch.nn.Linear(3, 4), chunk_size=0)
