"""Archangel's offline PPO (loss `ppo`): its maths against hand computations, the per-token
reference log-probs file, the policy + value-head model, and a real tiny training run.

The hand computations use plain Python floats (the `statistics` module for mean and variance)
and the derivatives are written out case by case, never by calling `halos.rl.ppo_math`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_halos
from transformers import LlamaConfig, LlamaForCausalLM

from halos.losses import TokenLogps, build_loss, get_loss_class
from halos.models.value_head import VALUE_HEAD_FILE, PolicyValueModel
from halos.rl import ppo_math as rl
from halos.train.reference import ReferenceLogps, ReferenceMismatch, write_reference_file

GAMMA, LAM = 0.9, 0.5
# Two rows on the (B, T-1) grid: row 0 is response, response, response, padding; row 1 is
# prompt, response, response, response. Values off the mask are junk that must not matter.
MASK = torch.tensor([[True, True, True, False], [False, True, True, True]])
VALUES = torch.tensor([[0.5, 0.2, -0.1, 9.0], [7.0, 0.3, 0.1, 0.4]], dtype=torch.float64)
SCORES = torch.tensor([1.0, -1.0], dtype=torch.float64)  # desirable, undesirable


def hand_gae(rewards: list[float], values: list[float]) -> list[float]:
    """A_t = δ_t + γλ A_{t+1}, δ_t = r_t + γ V_{t+1} − V_t, V = 0 past the end (one response)."""
    advantages, last = [], 0.0
    for t in reversed(range(len(values))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        last = rewards[t] + GAMMA * next_value - values[t] + GAMMA * LAM * last
        advantages.insert(0, last)
    return advantages


# The two responses by hand: row 0 = V [0.5, 0.2, -0.1], reward +1 at its end; row 1 = V [0.3,
# 0.1, 0.4], reward -1 at its end. E.g. row 0: A_2 = 1 + 0 + 0.1 = 1.1,
# A_1 = 0.9·(−0.1) − 0.2 + 0.45·1.1 = 0.205, A_0 = 0.9·0.2 − 0.5 + 0.45·0.205 = −0.22775.
ROW0 = [-0.22775, 0.205, 1.1]
ROW1 = [-0.3765, -0.37, -1.4]


def test_gae_matches_the_hand_computation_with_padding() -> None:
    assert hand_gae([0, 0, 1], [0.5, 0.2, -0.1]) == pytest.approx(ROW0)
    assert hand_gae([0, 0, -1], [0.3, 0.1, 0.4]) == pytest.approx(ROW1)
    rewards = rl.last_token_rewards(SCORES, MASK)
    assert rewards.tolist() == [[0, 0, 1, 0], [0, 0, 0, -1]]
    advantages, returns = rl.gae(rewards, VALUES, MASK, GAMMA, LAM)
    expected = torch.tensor([ROW0 + [0.0], [0.0] + ROW1], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + VALUES) * MASK)
    assert returns[0, 2] == pytest.approx(1.0) and returns[1, 3] == pytest.approx(-1.0)


def test_masked_whiten_matches_the_hand_computation() -> None:
    flat = ROW0 + ROW1
    mean, std = statistics.mean(flat), math.sqrt(statistics.variance(flat) + 1e-8)  # n − 1
    grid = torch.tensor([ROW0 + [5.0], [-3.0] + ROW1], dtype=torch.float64)
    whitened = rl.masked_whiten(grid, MASK)
    expected = [[(x - mean) / std for x in ROW0] + [0.0], [0.0] + [(x - mean) / std for x in ROW1]]
    torch.testing.assert_close(whitened, torch.tensor(expected, dtype=torch.float64))
    scaled = rl.masked_whiten(grid, MASK, shift_mean=False)
    torch.testing.assert_close(scaled[MASK], whitened[MASK] + mean)


# ----------------------------------------------------------------------------- clipped losses
EPS = 0.2
# Tokens chosen to hit every case of the clipped objective: ratio inside the range, above it
# and below it, with positive and negative advantages (the last column is padding).
LOGPS_NEW = torch.tensor([[-1.0, -0.5, -2.0, -0.3], [-0.7, -1.6, -0.2, -1.0]], dtype=torch.float64)
LOGPS_OLD = torch.tensor([[-1.1, -1.0, -1.5, -0.3], [-1.2, -1.1, -0.25, -2.0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([[0.7, 1.3, -0.8, 2.0], [-1.1, 0.4, 0.9, 5.0]], dtype=torch.float64)
TOKENS = torch.tensor([[True, True, True, False], [True, True, True, False]])


def test_clipped_policy_loss_values_and_gradients_follow_the_formula() -> None:
    logps = LOGPS_NEW.clone().requires_grad_(True)
    out = rl.clipped_policy_loss(logps, LOGPS_OLD, ADVANTAGES, TOKENS, EPS)
    (grad,) = torch.autograd.grad(out.loss, logps)

    n = int(TOKENS.sum())
    loss, clipped, expected_grad = 0.0, 0, torch.zeros_like(LOGPS_NEW)
    for b, t in TOKENS.nonzero().tolist():
        ratio = math.exp(LOGPS_NEW[b, t] - LOGPS_OLD[b, t])
        a = float(ADVANTAGES[b, t])
        clip = min(max(ratio, 1 - EPS), 1 + EPS)
        loss += max(-a * ratio, -a * clip) / n
        # The clipped branch is taken (and has no gradient) when A > 0 and ρ > 1 + ε, or when
        # A < 0 and ρ < 1 − ε; otherwise d(−Aρ)/d log π = −Aρ.
        if (a > 0 and ratio > 1 + EPS) or (a < 0 and ratio < 1 - EPS):
            clipped += 1
        else:
            expected_grad[b, t] = -a * ratio / n
    assert 0 < clipped < n  # both branches are exercised
    assert out.loss.item() == pytest.approx(loss)
    torch.testing.assert_close(grad, expected_grad)
    assert float(out.clipfrac) == pytest.approx(clipped / n)
    log_ratios = [float(LOGPS_NEW[b, t] - LOGPS_OLD[b, t]) for b, t in TOKENS.nonzero().tolist()]
    assert float(out.approxkl) == pytest.approx(0.5 * statistics.mean(x * x for x in log_ratios))


def test_clipped_value_loss_values_and_gradients_follow_the_formula() -> None:
    old = torch.tensor([[0.0, 1.0, -1.0, 0.0], [0.5, 0.5, 2.0, 0.0]], dtype=torch.float64)
    new = torch.tensor([[0.1, 1.5, -1.6, 3.0], [0.9, 0.0, 2.05, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 2.0, -1.2, 0.0], [0.0, -1.0, 1.0, 0.0]], dtype=torch.float64)
    values = new.clone().requires_grad_(True)
    out = rl.clipped_value_loss(values, old, returns, TOKENS, EPS)
    (grad,) = torch.autograd.grad(out.loss, values)

    n = int(TOKENS.sum())
    loss, clipped, expected_grad = 0.0, 0, torch.zeros_like(new)
    for b, t in TOKENS.nonzero().tolist():
        v, v_old, r = float(new[b, t]), float(old[b, t]), float(returns[b, t])
        v_clip = min(max(v, v_old - EPS), v_old + EPS)
        loss += 0.5 * max((v - r) ** 2, (v_clip - r) ** 2) / n
        if (v_clip - r) ** 2 > (v - r) ** 2:  # the clipped value (constant in V) is used
            clipped += 1
        else:
            expected_grad[b, t] = (v - r) / n
    assert 0 < clipped < n
    assert out.loss.item() == pytest.approx(loss)
    torch.testing.assert_close(grad, expected_grad)
    assert float(out.clipfrac) == pytest.approx(clipped / n)


# ----------------------------------------------------------------------------- the loss
def test_offline_ppo_loss_is_policy_plus_critic_plus_kl_with_hand_gradients() -> None:
    loss_fn = build_loss("ppo", {"cliprange": EPS, "gamma": GAMMA, "lam": LAM,
                                 "critic_coef": 0.3, "kl_coef": 0.1})
    desirable = torch.tensor([True, False])
    logps = LOGPS_NEW.clone().requires_grad_(True)
    values = VALUES.clone().requires_grad_(True)
    policy = TokenLogps(logps * MASK, MASK, desirable, values)
    out = loss_fn(policy, TokenLogps(LOGPS_OLD * MASK, MASK, desirable))
    total = out.losses.mean()
    d_logps, d_values = torch.autograd.grad(total, [logps, values])

    # Advantages: the hand GAE of the rows above, whitened; returns: GAE + values.
    flat = ROW0 + ROW1
    mean, std = statistics.mean(flat), math.sqrt(statistics.variance(flat) + 1e-8)
    adv = {(0, t): (x - mean) / std for t, x in enumerate(ROW0)}
    adv |= {(1, t + 1): (x - mean) / std for t, x in enumerate(ROW1)}
    raw = {(0, t): x for t, x in enumerate(ROW0)} | {(1, t + 1): x for t, x in enumerate(ROW1)}
    n = len(adv)
    pg = vf = kl = 0.0
    want_logps, want_values = torch.zeros_like(logps), torch.zeros_like(values)
    for (b, t), a in adv.items():
        log_ratio = float(LOGPS_NEW[b, t] - LOGPS_OLD[b, t])
        ratio = math.exp(log_ratio)
        pg += max(-a * ratio, -a * min(max(ratio, 1 - EPS), 1 + EPS)) / n
        target = raw[b, t] + float(VALUES[b, t])
        vf += 0.5 * (float(VALUES[b, t]) - target) ** 2 / n  # V = V_old: the clip never binds
        kl += -log_ratio / n
        active = not ((a > 0 and ratio > 1 + EPS) or (a < 0 and ratio < 1 - EPS))
        want_logps[b, t] = (-a * ratio * active - 0.1) / n
        want_values[b, t] = 0.3 * (float(VALUES[b, t]) - target) / n
    assert total.item() == pytest.approx(pg + 0.3 * vf + 0.1 * kl)
    assert float(out.metrics["loss/policy"]) == pytest.approx(pg)
    assert float(out.metrics["loss/value"]) == pytest.approx(vf)
    assert float(out.metrics["loss/kl"]) == pytest.approx(kl)
    assert float(out.metrics["val/clipfrac"]) == 0
    torch.testing.assert_close(d_logps, want_logps)
    torch.testing.assert_close(d_values, want_values)
    assert out.losses.shape == (2,)


def test_offline_ppo_declares_what_the_trainer_must_give_it() -> None:
    cls = get_loss_class("ppo")
    assert (cls.batch_kind, cls.needs_reference, cls.token_level, cls.model_head) == (
        "unpaired", True, True, "causal_lm_value_head")
    # HALOs' config/loss/ppo.yaml names and defaults (KL_coef there).
    assert {k: p.default for k, p in cls.hyperparameters().items()} == {
        "cliprange": 0.5, "gamma": 0.99, "lam": 0.95, "critic_coef": 0.01, "kl_coef": 0.1}
    for doc in ("1707.06347", "1506.02438", "2402.01306", "Eq. 7", "Eq. 9", "Eq. 16"):
        assert doc in cls.__doc__
    with pytest.raises(ValueError, match="ppo: cliprange"):
        build_loss("ppo", {"cliprange": 1.5})
    with pytest.raises(ValueError, match="needs reference log-probs"):
        build_loss("ppo")(TokenLogps(LOGPS_NEW, TOKENS, torch.tensor([True, False]), VALUES))


# ----------------------------------------------------------------------------- reference file
def _write(path: Path, token_logps: torch.Tensor | None) -> None:
    keys = torch.tensor([30, -7, 12])  # unsorted on purpose: the file sorts by key
    tokens = torch.tensor([2, 3, 1])
    sums = torch.tensor([-3.0, -6.0, -0.5])
    write_reference_file(path, keys, sums, tokens, model="m", identity="id",
                         data_fingerprint="fp", token_logps=token_logps)


def test_per_token_reference_log_probs_round_trip_onto_a_batch_grid(tmp_path: Path) -> None:
    path = tmp_path / "ref.pt"
    _write(path, torch.tensor([-1.0, -2.0, -1.5, -2.5, -2.0, -0.5]))
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
    ref = ReferenceLogps(path)
    # A batch in another order with its own padding: row 0 = key 12 (1 token), row 1 = key 30.
    mask = torch.tensor([[False, False, True, False], [False, True, True, False]])
    grid = ref.lookup_tokens(torch.tensor([12, 30]), mask)
    assert grid.tolist() == [[0, 0, -0.5, 0], [0, -1.0, -2.0, 0]]
    assert ref.lookup(torch.tensor([-7]))[0].tolist() == [-6.0]
    # Per-sequence readers see the same format and fields as before.
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == 1 and {"keys", "sums", "tokens"} <= set(payload)
    assert payload["token_offsets"].tolist() == [0, 3, 4, 6]  # keys -7, 12, 30
    with pytest.raises(ReferenceMismatch, match="other tokens"):
        ref.lookup_tokens(torch.tensor([12]), torch.tensor([[True, True]]))


def test_a_file_without_per_token_log_probs_is_refused_by_token_level_losses(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    _write(path, None)
    ref = ReferenceLogps(path)
    assert ref.lookup(torch.tensor([30]))[0].tolist() == [-3.0]  # per-sequence losses still work
    with pytest.raises(ReferenceMismatch, match=r"per-token ones: recompute it with `halos ref-logps`"):
        ref.lookup_tokens(torch.tensor([30]), torch.tensor([[True, True]]))
    with pytest.raises(ValueError, match="per-token log-probs for 6 scored tokens"):
        _write(tmp_path / "bad.pt", torch.zeros(5))


# ----------------------------------------------------------------------------- the model
def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def test_policy_value_model_gives_log_probs_and_values_and_saves_a_causal_lm(
        tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from halos.train.logps import CausalLMLogps

    model = PolicyValueModel(_tiny_llama(), chunk_size=5)
    assert model.model.lm_head.weight.requires_grad  # the policy trains its LM head
    input_ids = torch.randint(0, 61, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[0, 3:] = loss_mask[1, 5:] = True
    logps, mask, values = model(input_ids, attention_mask, loss_mask)
    want_logps, want_mask = CausalLMLogps(model.model, token_level=True)(
        input_ids, attention_mask, loss_mask)
    torch.testing.assert_close(logps, want_logps)
    assert torch.equal(mask, want_mask) and mask.sum(-1).tolist() == [4, 2]
    torch.testing.assert_close(values, model.token_values(input_ids, attention_mask))

    model.save_pretrained(tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    again = PolicyValueModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids, attention_mask, loss_mask)[2], values)
        torch.testing.assert_close(
            CausalLMLogps(reloaded, token_level=True)(input_ids, attention_mask, loss_mask)[0],
            logps)


# ----------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_halos_align_ppo_trains_the_tiny_model(tiny_model: Path, synthetic_data: Path,
                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from halos.config import TrainConfig
    from halos.train.run import open_reference

    ref = tmp_path / "ref_logps.pt"
    run_halos("ref-logps", "--model", tiny_model, "--data", synthetic_data, "--out", ref, *FAST,
              "--micro-batch-size", "64")
    out = tmp_path / "ppo"
    result = run_halos("align", "--loss", "ppo", "--model", tiny_model, "--data", synthetic_data,
                       "--ref-logps", ref, "--out", out, *FAST, "--max-steps", "40",
                       "--eval-examples", "128", "--learning-rate", "1e-3", "--critic-coef", "0.1")
    assert "train (unpaired): tokenized" in result.stdout + result.stderr  # pairs, converted
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    final = [r for r in rows if r["split"] == "eval"][-1]
    assert len(train) == 40
    for key in ("loss/policy", "loss/value", "loss/kl", "policy/clipfrac", "policy/approxkl",
                "val/clipfrac", "objective/kl", "logratio/desirable", "logratio/undesirable"):
        assert math.isfinite(final[key]) and math.isfinite(train[-1][key]), key
    # Step 1 is the reference itself: ratio 1, so the policy loss is −mean(whitened Â) = 0.
    assert abs(train[0]["loss/policy"]) < 1e-4 and abs(train[0]["objective/kl"]) < 1e-3
    # Step 1's loss is the untrained one: 0 + critic_coef × the new value head's error.
    assert final["loss"] < train[0]["loss"] and final["loss/value"] < train[0]["loss/value"], (
        train[0], final)
    # On the held-out split the policy moved towards the desirable completions.
    assert final["logratio/desirable"] > final["logratio/undesirable"], final

    model = out / "model"
    head = load_file(model / VALUE_HEAD_FILE)
    assert head["v_head.summary.weight"].shape == (1, AutoConfig.from_pretrained(model).hidden_size)
    AutoModelForCausalLM.from_pretrained(model)  # an ordinary causal LM folder
    assert json.loads((model / "halos_training.json").read_text())["loss"] == "ppo"

    # A reference file without per-token log-probs (an older `halos ref-logps`) is refused.
    payload = torch.load(ref, weights_only=True)
    old = tmp_path / "old_ref_logps.pt"
    torch.save({k: v for k, v in payload.items() if not k.startswith("token_")}, old)
    cfg = TrainConfig(model=str(tiny_model), data=str(synthetic_data), out="unused",
                      ref_logps=str(old))
    with pytest.raises(ReferenceMismatch, match="recompute it with `halos ref-logps`"):
        open_reference(cfg, build_loss("ppo"), [])
