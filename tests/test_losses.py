"""Every alignment loss against an independent implementation of its paper's formula.

Each `expected_*` below is written from the paper's equation with textbook primitives
(σ(x) = 1/(1+e^-x), log σ(x) = -log(1+e^-x), odds = P/(1-P)), never by calling the classes. Values
and gradients (w.r.t. the policy log-prob tensors, float64) must agree; gradients are compared on
a random weighting Σ_i w_i L_i, so each example's gradient is checked, not only their sum.
"""

from __future__ import annotations

import math
import re
import textwrap
import time
from decimal import Decimal, getcontext
from pathlib import Path

import pytest
import torch

from halos.losses import (
    LOSSES,
    PairedLogps,
    SFTLogps,
    UnpairedLogps,
    build_loss,
    get_loss_class,
)
from halos.losses import functional as F_losses
from halos.losses.kto import KTOLoss

ISSUE_LOSSES = {"sft", "csft", "dpo", "cdpo", "robust", "ipo", "slic", "kto", "cpo", "orpo",
                "simpo", "rm"}
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the formulas
def sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def log_sigmoid(x):
    return -torch.log(1 + torch.exp(-x))


def expected_dpo(p, r, beta):  # Rafailov et al., Eq. 7
    h = (p.chosen - r.chosen) - (p.rejected - r.rejected)
    return -log_sigmoid(beta * h)


def expected_cdpo(p, r, beta, eps):  # Mitchell (2023): BCE against a label flipped w.p. ε
    h = (p.chosen - r.chosen) - (p.rejected - r.rejected)
    return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)


def expected_robust(p, r, beta, eps):  # Chowdhury et al.: de-biased loss
    h = (p.chosen - r.chosen) - (p.rejected - r.rejected)
    return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)


def expected_ipo(p, r, tau):  # Azar et al., Eq. 17 (inputs are length-averaged log-probs)
    h = (p.chosen - r.chosen) - (p.rejected - r.rejected)
    return (h - 1 / (2 * tau)) ** 2


def expected_slic(p, delta, lam):  # Zhao et al., Eq. 1
    return torch.clamp(delta - p.chosen + p.rejected, min=0) + lam * -p.chosen


def expected_cpo(p, beta, alpha):  # Xu et al.: L_prefer + α L_NLL (NLL per token here)
    return -log_sigmoid(beta * p.chosen - beta * p.rejected) + alpha * -(p.chosen / p.chosen_tokens)


def expected_simpo(p, beta, gamma, alpha):  # Meng et al., Eq. 6 (+ CPO NLL); averaged inputs
    return -log_sigmoid(beta * p.chosen - beta * p.rejected - gamma) + alpha * -p.chosen


def expected_orpo(p, lam):  # Hong et al., Eq. 6-7; P = exp(average log-prob)
    def log_odds(avg):
        prob = torch.exp(avg)
        return torch.log(prob / (1 - prob))

    return -p.chosen + lam * -log_sigmoid(log_odds(p.chosen) - log_odds(p.rejected))


def expected_kto(p, r, beta, w_d=1.0, w_u=1.0):  # Ethayarajh et al., Eq. 8, one example at a time
    z = max(0.0, float((p.kl - r.kl).detach().mean()))
    out = []
    for i in range(len(p.completion)):
        reward = p.completion[i] - r.completion[i]
        if bool(p.desirable[i]):
            out.append(w_d * (1 - sigmoid(beta * (reward - z))))
        else:
            out.append(w_u * (1 - sigmoid(beta * (z - reward))))
    return torch.stack(out)


def expected_rm(p):  # Ouyang et al., Eq. 1 (inputs are value-head scores)
    return -log_sigmoid(p.chosen - p.rejected)


def expected_token_mean_nll(completion, tokens):  # SFT: -Σ log p / Σ |y|
    return -completion.sum() / tokens.sum()


# ----------------------------------------------------------------------------- inputs
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _uniform(n, low, high, gen, grad=False):
    x = low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
    return x.requires_grad_(grad)


def paired(b=6, seed=0, averaged=False):
    """(policy, reference) log-probs: summed in (-60, -1), or averaged in (-3, -0.02)."""
    gen = _gen(seed)
    low, high = (-3.0, -0.02) if averaged else (-60.0, -1.0)
    tokens = [torch.randint(1, 30, (b,), generator=gen) for _ in range(2)]
    policy = PairedLogps(_uniform(b, low, high, gen, True), _uniform(b, low, high, gen, True),
                         *tokens)
    reference = PairedLogps(_uniform(b, low, high, gen), _uniform(b, low, high, gen), *tokens)
    return policy, reference


def unpaired(b=7, seed=0, desirable=None):
    gen = _gen(seed)
    if desirable is None:  # random labels, both kinds present from b = 2 on
        desirable = torch.rand(b, generator=gen) < 0.5
        desirable[-1] = False
        desirable[0] = True
    desirable = torch.as_tensor(desirable, dtype=torch.bool).expand(b).clone()
    tokens = torch.randint(1, 30, (b,), generator=gen)
    policy = UnpairedLogps(_uniform(b, -60, -1, gen, True), tokens, desirable,
                           kl=_uniform(b, -60, -1, gen))
    reference = UnpairedLogps(_uniform(b, -60, -1, gen), tokens, desirable,
                              kl=_uniform(b, -60, -1, gen))
    return policy, reference


def assert_parity(actual, expected, inputs, seed=0):
    """Values equal; gradients of a random weighting equal for every input tensor."""
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    weights = torch.rand(actual.shape, generator=_gen(seed + 100), dtype=torch.float64)
    got = torch.autograd.grad((weights * actual).sum(), inputs, retain_graph=True)
    want = torch.autograd.grad((weights * expected).sum(), inputs, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- registry
def test_every_loss_of_the_issue_is_registered():
    assert ISSUE_LOSSES <= set(LOSSES)


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(KeyError, match=r"unknown loss 'dpoo'; choose from \[.*'dpo'.*'kto'"):
        build_loss("dpoo")


def test_unknown_hyperparameter_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"no hyperparameter\(s\) \['gamma'\]; valid: beta=2.0, "
                                         r"simpo_gamma=1.0, cpo_alpha=1.0"):
        build_loss("simpo", {"gamma": 0.5})
    with pytest.raises(ValueError, match=r"valid: none"):
        build_loss("rm", {"beta": 0.1})


SEED_DEFAULTS = {  # the seeds' names and defaults (ms-swift's docs; HALOs for SLiC and IPO)
    "sft": {}, "csft": {}, "rm": {},
    "dpo": {"beta": 0.1, "rpo_alpha": None},
    "cdpo": {"beta": 0.1, "label_smoothing": 0.2, "rpo_alpha": None},
    "robust": {"beta": 0.1, "label_smoothing": 0.2, "rpo_alpha": None},
    "ipo": {"tau": 0.1},
    "slic": {"delta": 1.0, "lambda_coef": 0.1},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "cpo": {"beta": 0.1, "cpo_alpha": 1.0},
    "orpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 1.0},
    "ppo": {"cliprange": 0.5, "gamma": 0.99, "lam": 0.95, "critic_coef": 0.01, "kl_coef": 0.1},
}


@pytest.mark.parametrize("name", sorted(SEED_DEFAULTS))
def test_hyperparameters_list_the_seed_defaults(name):
    params = get_loss_class(name).hyperparameters()
    assert {k: p.default for k, p in params.items()} == SEED_DEFAULTS[name]
    built = build_loss(name)  # every loss builds with its defaults
    for key, value in SEED_DEFAULTS[name].items():
        assert getattr(built, key) == value


# name: (batch_kind, needs_reference, average_logps, needs_kl_pairs, model_head)
CAPABILITIES = {
    "sft": ("sft", False, False, False, "causal_lm"),
    "csft": ("unpaired", False, False, False, "causal_lm"),
    "dpo": ("paired", True, False, False, "causal_lm"),
    "cdpo": ("paired", True, False, False, "causal_lm"),
    "robust": ("paired", True, False, False, "causal_lm"),
    "ipo": ("paired", True, True, False, "causal_lm"),
    "slic": ("paired", False, False, False, "causal_lm"),
    "kto": ("unpaired", True, False, True, "causal_lm"),
    "cpo": ("paired", False, False, False, "causal_lm"),
    "simpo": ("paired", False, True, False, "causal_lm"),
    "orpo": ("paired", False, True, False, "causal_lm"),
    "rm": ("paired", False, False, False, "value_head"),
    "ppo": ("unpaired", True, False, False, "causal_lm_value_head"),
}


@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_capabilities(name):
    cls = get_loss_class(name)
    got = (cls.batch_kind, cls.needs_reference, cls.average_logps, cls.needs_kl_pairs,
           cls.model_head)
    assert got == CAPABILITIES[name]
    assert "arxiv.org/abs/" in cls.__doc__ or name in ("sft", "cdpo")  # paper cited


@pytest.mark.parametrize("name, params", [
    ("dpo", {"beta": 0}), ("cdpo", {"label_smoothing": 0.6}), ("robust", {"label_smoothing": 0.5}),
    ("ipo", {"tau": -1}), ("kto", {"desirable_weight": 0}), ("simpo", {"beta": -2}),
    ("slic", {"delta": -1}), ("cpo", {"cpo_alpha": -1}), ("orpo", {"beta": -0.1}),
])
def test_invalid_values_are_clear_errors(name, params):
    with pytest.raises(ValueError, match=f"{name}: {next(iter(params))}"):
        build_loss(name, params)


def test_a_variant_needs_no_code():
    policy, reference = paired()
    loss = build_loss("dpo", {"beta": 0.5})
    assert_parity(loss(policy, reference).losses, expected_dpo(policy, reference, 0.5),
                  [policy.chosen, policy.rejected])


def test_reference_losses_refuse_a_missing_reference():
    policy, _ = paired()
    with pytest.raises(ValueError, match="needs reference log-probs"):
        build_loss("dpo")(policy, None)


# ----------------------------------------------------------------------------- parity
PAIRED_CASES = [  # name, params, averaged inputs, expected(policy, reference)
    ("dpo", {}, False, lambda p, r: expected_dpo(p, r, 0.1)),
    ("dpo", {"beta": 0.3, "rpo_alpha": 0.5}, False,
     lambda p, r: expected_dpo(p, r, 0.3) + 0.5 * -(p.chosen / p.chosen_tokens)),
    ("cdpo", {}, False, lambda p, r: expected_cdpo(p, r, 0.1, 0.2)),
    ("cdpo", {"beta": 0.05, "label_smoothing": 0.4}, False,
     lambda p, r: expected_cdpo(p, r, 0.05, 0.4)),
    ("robust", {}, False, lambda p, r: expected_robust(p, r, 0.1, 0.2)),
    ("robust", {"beta": 0.2, "label_smoothing": 0.1}, False,
     lambda p, r: expected_robust(p, r, 0.2, 0.1)),
    ("ipo", {}, True, lambda p, r: expected_ipo(p, r, 0.1)),
    ("ipo", {"tau": 0.5}, True, lambda p, r: expected_ipo(p, r, 0.5)),
    ("slic", {}, False, lambda p, r: expected_slic(p, 1.0, 0.1)),
    ("slic", {"delta": 5.0, "lambda_coef": 0.0}, False, lambda p, r: expected_slic(p, 5.0, 0.0)),
    ("cpo", {}, False, lambda p, r: expected_cpo(p, 0.1, 1.0)),
    ("cpo", {"beta": 0.5, "cpo_alpha": 0.0}, False, lambda p, r: expected_cpo(p, 0.5, 0.0)),
    ("simpo", {}, True, lambda p, r: expected_simpo(p, 2.0, 1.0, 1.0)),
    ("simpo", {"cpo_alpha": 0.0}, True, lambda p, r: expected_simpo(p, 2.0, 1.0, 0.0)),
    ("simpo", {"beta": 2.5, "simpo_gamma": 0.3}, True, lambda p, r: expected_simpo(p, 2.5, 0.3, 1.0)),
    ("orpo", {}, True, lambda p, r: expected_orpo(p, 0.1)),
    ("orpo", {"beta": 1.0}, True, lambda p, r: expected_orpo(p, 1.0)),
    ("rm", {}, False, lambda p, r: expected_rm(p)),
]


@pytest.mark.parametrize("b", [1, 6])
@pytest.mark.parametrize("name, params, averaged, expected", PAIRED_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PAIRED_CASES)])
def test_paired_losses_match_the_paper(name, params, averaged, expected, b):
    loss = build_loss(name, params)
    assert loss.average_logps == averaged  # the inputs below are what the trainer would pass
    policy, reference = paired(b, seed=b, averaged=averaged)
    out = loss(policy, reference if loss.needs_reference else None)
    assert out.losses.shape == (b,)
    assert_parity(out.losses, expected(policy, reference), [policy.chosen, policy.rejected])
    for key, value in out.metrics.items():
        assert not value.requires_grad, key
        assert torch.isfinite(value).all(), key


def test_dpo_gradient_is_the_closed_form():
    """∂L/∂log π(y_w) = -β σ(-β h) = -∂L/∂log π(y_l) (Rafailov et al., Sec. 4)."""
    policy, reference = paired(5)
    beta = 0.1
    losses = build_loss("dpo", {"beta": beta})(policy, reference).losses
    grad_chosen, grad_rejected = torch.autograd.grad(losses.sum(), [policy.chosen, policy.rejected])
    h = (policy.chosen - reference.chosen - policy.rejected + reference.rejected).detach()
    torch.testing.assert_close(grad_chosen, -beta * sigmoid(-beta * h))
    torch.testing.assert_close(grad_rejected, beta * sigmoid(-beta * h))


@pytest.mark.parametrize("b", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_matches_the_paper(b, weights):
    policy, reference = unpaired(b, seed=b)
    loss = build_loss("kto", {"beta": 0.1, "desirable_weight": weights[0],
                              "undesirable_weight": weights[1]})
    out = loss(policy, reference)
    assert out.losses.shape == (b,)
    assert_parity(out.losses, expected_kto(policy, reference, 0.1, *weights), [policy.completion])


@pytest.mark.parametrize("name", ["sft", "csft"])
@pytest.mark.parametrize("b", [1, 5])
def test_sft_losses_are_the_token_mean_nll(name, b):
    gen = _gen(b)
    completion = _uniform(b, -80, -1, gen, True)
    tokens = torch.randint(1, 40, (b,), generator=gen)
    if name == "sft":
        logps = SFTLogps(completion, tokens)
    else:
        logps = UnpairedLogps(completion, tokens, torch.arange(b) % 2 == 0)
    out = build_loss(name)(logps, None)
    assert out.losses.shape == (b,)
    expected = expected_token_mean_nll(completion, tokens)
    torch.testing.assert_close(out.losses.mean(), expected)
    torch.testing.assert_close(out.metrics["nll"], expected.detach())
    got, = torch.autograd.grad(out.losses.mean(), completion)
    torch.testing.assert_close(got, -torch.ones(b, dtype=torch.float64) / tokens.sum())


ALL_CASES = [(n, p, a) for n, p, a, _ in PAIRED_CASES] + [("kto", {}, False), ("sft", {}, False),
                                                           ("csft", {}, False)]


@pytest.mark.parametrize("name, params, averaged", ALL_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(ALL_CASES)])
def test_gradients_match_finite_differences(name, params, averaged):
    loss = build_loss(name, params)
    if loss.batch_kind == "paired":
        policy, reference = paired(3, averaged=averaged)
        inputs = (policy.chosen, policy.rejected)

        def fn(chosen, rejected):
            p = PairedLogps(chosen, rejected, policy.chosen_tokens, policy.rejected_tokens)
            return loss(p, reference).losses
    else:
        policy, reference = unpaired(3)
        inputs = (policy.completion,)

        def fn(completion):
            if loss.batch_kind == "sft":
                return loss(SFTLogps(completion, policy.tokens), None).losses
            return loss(UnpairedLogps(completion, policy.tokens, policy.desirable, policy.kl),
                        reference).losses
    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("name, slope", [("dpo", -0.5), ("cdpo", -0.5 * (1 - 2 * 0.2)),
                                         ("robust", -0.5 / (1 - 2 * 0.2))])
def test_beta_to_zero_gives_log2_and_vanishing_gradients(name, slope):
    """β → 0: the loss → log 2 and ∂L/∂log π(y_w) → β × slope → 0, with slope -1/2 for DPO,
    -(1-ε)/2 + ε/2 for cDPO (label smoothing pulls both ways) and -1/(2(1-2ε)) for rDPO (its de-biasing divides by 1-2ε)."""
    policy, reference = paired(4)
    for beta in (1e-4, 1e-8):
        losses = build_loss(name, {"beta": beta})(policy, reference).losses
        # |L - log 2| <= β|h|/2 with |h| < 120 here
        torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), atol=60 * beta,
                                   rtol=0)
        grad, = torch.autograd.grad(losses.sum(), policy.chosen)
        torch.testing.assert_close(grad / beta, torch.full_like(grad, slope), atol=1e-2, rtol=0)


def _equal_pair(b=4, averaged=False):
    policy, reference = paired(b, averaged=averaged)
    same = policy.chosen.detach().clone().requires_grad_(True)
    policy = PairedLogps(same, same, policy.chosen_tokens, policy.chosen_tokens)
    reference = PairedLogps(reference.chosen, reference.chosen, reference.chosen_tokens,
                            reference.chosen_tokens)
    return policy, reference


@pytest.mark.parametrize("name, params, averaged, value", [
    ("dpo", {}, False, lambda p: math.log(2)),
    ("cdpo", {}, False, lambda p: math.log(2)),
    ("robust", {}, False, lambda p: math.log(2)),
    ("ipo", {"tau": 0.1}, True, lambda p: 1 / (4 * 0.1**2)),
    ("slic", {}, False, lambda p: 1.0 + 0.1 * -p.chosen),
    ("cpo", {}, False, lambda p: math.log(2) + -p.chosen / p.chosen_tokens),
    ("simpo", {}, True, lambda p: -math.log(sigmoid(torch.tensor(-1.0)).item()) + -p.chosen),
    ("orpo", {}, True, lambda p: -p.chosen + 0.1 * math.log(2)),
    ("rm", {}, False, lambda p: math.log(2)),
])
def test_chosen_equal_to_rejected(name, params, averaged, value):
    policy, reference = _equal_pair(averaged=averaged)
    out = build_loss(name, params)(policy, reference)
    expected = value(policy)
    expected = expected.detach() if torch.is_tensor(expected) else torch.full_like(out.losses, expected)
    torch.testing.assert_close(out.losses.detach(), expected)
    assert (out.metrics["rewards/accuracy"] == 0).all()
    assert (out.metrics["rewards/margin"] == 0).all()


def test_dpo_equal_pair_gradient_cancels_through_a_shared_tensor():
    """With y_w == y_l the same log-prob feeds both sides: the preference term's gradient is 0."""
    policy, reference = _equal_pair()
    losses = build_loss("dpo")(policy, reference).losses
    grad, = torch.autograd.grad(losses.sum(), policy.chosen)
    torch.testing.assert_close(grad, torch.zeros_like(grad))


def test_cdpo_without_smoothing_is_dpo():
    policy, reference = paired()
    torch.testing.assert_close(build_loss("cdpo", {"label_smoothing": 0.0})(policy, reference).losses,
                               build_loss("dpo")(policy, reference).losses)


def test_robust_dpo_is_unbiased_under_label_flips():
    """Chowdhury et al.'s point: E_flip[L̂_ε] = (1-ε) L̂_ε(h) + ε L̂_ε(-h) = clean DPO loss."""
    policy, reference = paired()
    eps = 0.3
    loss = build_loss("robust", {"label_smoothing": eps})
    flipped = PairedLogps(policy.rejected, policy.chosen, policy.rejected_tokens,
                          policy.chosen_tokens)
    flipped_ref = PairedLogps(reference.rejected, reference.chosen, reference.rejected_tokens,
                              reference.chosen_tokens)
    noisy = (1 - eps) * loss(policy, reference).losses + eps * loss(flipped, flipped_ref).losses
    torch.testing.assert_close(noisy, build_loss("dpo")(policy, reference).losses)


def test_orpo_is_finite_at_probability_one():
    chosen = torch.tensor([0.0, -1e-9, -0.5], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-1e-12, -40.0, -0.5], dtype=torch.float64, requires_grad=True)
    tokens = torch.ones(3, dtype=torch.long)
    losses = build_loss("orpo")(PairedLogps(chosen, rejected, tokens, tokens)).losses
    assert torch.isfinite(losses).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(losses.sum(), [chosen, rejected]))


def test_log1mexp_is_accurate_on_both_sides_of_log_half():
    x = torch.tensor([-1e-10, -1e-3, -0.5, -math.log(2), -1.0, -30.0], dtype=torch.float64)
    getcontext().prec = 50  # the reference in 50-digit decimal arithmetic
    exact = [float((1 - Decimal(v).exp()).ln()) for v in x.tolist()]
    torch.testing.assert_close(F_losses.log1mexp(x), torch.tensor(exact, dtype=torch.float64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("desirable", [True, False])
@pytest.mark.parametrize("b", [1, 3])
def test_kto_batches_of_one_kind(desirable, b):
    policy, reference = unpaired(b, desirable=desirable)
    out = build_loss("kto")(policy, reference)
    assert_parity(out.losses, expected_kto(policy, reference, 0.1), [policy.completion])
    kind, other = ("desirable", "undesirable") if desirable else ("undesirable", "desirable")
    assert out.metrics[f"rewards/{kind}_count"] == b
    assert out.metrics[f"rewards/{other}_count"] == 0
    assert out.metrics[f"rewards/{other}_sum"] == 0
    rewards = 0.1 * (policy.completion - reference.completion).detach()
    torch.testing.assert_close(out.metrics[f"rewards/{kind}_sum"], rewards.sum())
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


def test_kto_reference_point_is_clamped_and_has_no_gradient():
    policy, reference = unpaired(5)
    policy.kl = (reference.kl - 3.0).requires_grad_(True)  # policy below reference: mean KL < 0
    out = build_loss("kto")(policy, reference)
    assert out.metrics["kl"] == 0
    assert_parity(out.losses, expected_kto(policy, reference, 0.1), [policy.completion])
    assert out.losses.sum().grad_fn is not None
    grad, = torch.autograd.grad(out.losses.sum(), policy.kl, allow_unused=True)
    assert grad is None
    policy.kl = (reference.kl + 2.0).detach()
    out = build_loss("kto")(policy, reference)
    torch.testing.assert_close(out.metrics["kl"], torch.tensor(2.0, dtype=torch.float64))


def test_kto_averages_the_reference_point_over_ranks(monkeypatch):
    """With 2 ranks, z = clamp((mean_rank0 + mean_rank1) / 2, 0); the other rank's mean is faked."""
    dist = F_losses.dist
    other_rank_kl = 7.0
    calls = []

    def fake_all_reduce(tensor, op=None):
        calls.append(op)
        tensor += other_rank_kl

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    policy, reference = unpaired(3)
    policy.kl = reference.kl - 1.0  # this rank alone would clamp to 0
    out = build_loss("kto")(policy, reference)
    assert calls == [dist.ReduceOp.SUM]
    torch.testing.assert_close(out.metrics["kl"], torch.tensor(3.0, dtype=torch.float64))
    z = 3.0
    r = policy.completion - reference.completion
    expected = torch.where(policy.desirable, 1 - sigmoid(0.1 * (r - z)), 1 - sigmoid(0.1 * (z - r)))
    assert_parity(out.losses, expected, [policy.completion])


def _kto_rank(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        policy, reference = unpaired(3, seed=rank)
        policy.kl = reference.kl + (4.0 if rank == 0 else -1.0)  # rank 1 alone would clamp to 0
        results.put((rank, float(build_loss("kto")(policy, reference).metrics["kl"])))
    finally:
        dist.destroy_process_group()


def test_kto_reference_point_over_two_real_ranks(tmp_path):
    """z is averaged over 2 gloo ranks before clamping: (4 + (-1)) / 2 = 1.5 on both."""
    import torch.multiprocessing as mp

    results = mp.get_context("fork").SimpleQueue()  # fork: the children need not import torch
    ranks = mp.start_processes(_kto_rank, args=(2, str(tmp_path / "init"), results), nprocs=2,
                               join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two KTO ranks did not finish within 60 s")
    assert sorted([results.get(), results.get()]) == [(0, pytest.approx(1.5)),
                                                      (1, pytest.approx(1.5))]


def test_kto_without_kl_pairs_is_a_clear_error():
    policy, reference = unpaired(3)
    policy.kl = None
    with pytest.raises(ValueError, match="mismatched pairs"):
        build_loss("kto")(policy, reference)


@pytest.mark.parametrize("n_d, n_u, w_d, w_u, ok", [
    (100, 100, 1.0, 1.0, True), (120, 100, 1.0, 1.0, True), (200, 100, 1.0, 1.0, False),
    (100, 400, 1.0, 1.0, False), (100, 400, 4.0, 1.0, True), (100, 400, 1.0, 0.25, True),
    (50, 0, 1.0, 1.0, False),
])
def test_kto_weight_ratio_warning(n_d, n_u, w_d, w_u, ok):
    message = KTOLoss.check_weights(n_d, n_u, w_d, w_u)
    assert (message is None) == ok
    if message and n_u:
        suggested = float(re.search(r"desirable_weight=([\d.]+)", message).group(1))
        assert 1 <= suggested * n_d / (w_u * n_u) <= 4 / 3 + 1e-2


def test_kto_dataset_warnings_use_its_weights():
    assert build_loss("kto").dataset_warnings({"desirable": 110, "undesirable": 100}) == []
    warnings = build_loss("kto").dataset_warnings({"desirable": 100, "undesirable": 300})
    assert len(warnings) == 1 and "outside the recommended [1, 4/3]" in warnings[0]
    assert build_loss("kto", {"desirable_weight": 3.0}).dataset_warnings(
        {"desirable": 100, "undesirable": 300}) == []


def test_kto_mean_rewards_from_microbatch_sums():
    """Two microbatches, one with no undesirable example: the mean over examples, not NaN."""
    outs = []
    for desirable in ([True, True, False], [True, True, True]):
        policy, reference = unpaired(3, desirable=torch.tensor(desirable))
        outs.append((build_loss("kto")(policy, reference).metrics,
                     0.1 * (policy.completion - reference.completion).detach(),
                     torch.tensor(desirable)))
    averaged = {k: sum(float(m[k]) for m, _, _ in outs) / 2 for k in outs[0][0]}
    means = F_losses.means_from_sums(averaged)
    rewards = torch.cat([r for _, r, _ in outs])
    mask = torch.cat([d for _, _, d in outs])
    assert means["rewards/desirable"] == pytest.approx(float(rewards[mask].mean()))
    assert means["rewards/undesirable"] == pytest.approx(float(rewards[~mask].mean()))
    assert math.isnan(F_losses.means_from_sums({"a_sum": 0.0, "a_count": 0.0})["a"])


def test_csft_control_tokens():
    loss = build_loss("csft")
    assert loss.extra_special_tokens == ("<|good|>", "<|bad|>")
    assert loss.prompt_suffix(True) == "<|good|>"
    assert loss.prompt_suffix(False) == "<|bad|>"
    assert build_loss("kto").prompt_suffix(True) == ""


# ----------------------------------------------------------------------------- a new loss
# The README's "add a new loss" example, verbatim: KTO in ~15 lines, as in the HALOs seed.
README_SNIPPET = '''\
import torch

from halos.losses import AlignmentLoss, LossOutput, UnpairedLogps, build_loss, register_loss


@register_loss("my-kto")
class MyKTOLoss(AlignmentLoss):
    """KTO (Ethayarajh et al., 2024, https://arxiv.org/abs/2402.01306), Eq. 8 with λD = λU = 1."""

    batch_kind = "unpaired"  # (prompt, completion, desirable?) examples
    needs_kl_pairs = True  # also score mismatched (prompt, completion) pairs, for z

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def loss(self, policy: UnpairedLogps, reference: UnpairedLogps) -> LossOutput:
        z = (policy.kl - reference.kl).mean().clamp(min=0).detach()
        r = policy.completion - reference.completion
        value = torch.sigmoid(self.beta * torch.where(policy.desirable, r - z, z - r))
        return LossOutput(losses=1 - value)


loss = build_loss("my-kto", {"beta": 0.2})  # in a run config: `loss: my-kto` and `beta: 0.2`
'''


def test_a_new_loss_is_one_subclass_and_one_registry_line():
    namespace: dict = {}
    try:
        exec(compile(README_SNIPPET, "README.md", "exec"), namespace)
        assert LOSSES["my-kto"] is namespace["MyKTOLoss"]
        class_lines = README_SNIPPET.split("@register_loss")[1].split("\n\n\nloss =")[0]
        assert len(class_lines.strip().splitlines()) <= 20
        policy, reference = unpaired(5)
        out = namespace["loss"](policy, reference)
        assert_parity(out.losses, build_loss("kto", {"beta": 0.2})(policy, reference).losses,
                      [policy.completion])
        with pytest.raises(ValueError, match="valid: beta=0.1"):
            build_loss("my-kto", {"gamma": 1})
    finally:
        LOSSES.pop("my-kto", None)


def test_readme_shows_exactly_the_tested_snippet():
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not written yet")
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    ours = [b for b in blocks if '@register_loss("my-kto")' in b]
    assert ours, "README.md: add the 'add a new loss' example (tests/test_losses.py README_SNIPPET)"
    assert textwrap.dedent(ours[0]) == README_SNIPPET


# ----------------------------------------------------------------------------- value head
@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def test_value_head_reads_the_last_scored_token_and_ignores_padding(tiny_lm):
    from halos.models.value_head import ValueHeadModel

    model = ValueHeadModel(tiny_lm)
    assert not tiny_lm.get_output_embeddings().weight.requires_grad  # unused LM head is frozen
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 8, 9, 10, 11]])
    attention = (torch.arange(7) < torch.tensor([[5], [7]])).long()
    loss_mask = torch.zeros(2, 7, dtype=torch.bool)
    loss_mask[0, 3:5] = loss_mask[1, 3:7] = True
    scores, tokens = model(ids, attention, loss_mask)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert tokens.tolist() == [2, 4]
    with torch.no_grad():
        hidden = tiny_lm.get_decoder()(input_ids=ids[:1, :5]).last_hidden_state
        alone = model.value_head(hidden[0, 4]).squeeze()
        longer = tiny_lm.get_decoder()(input_ids=ids[1:]).last_hidden_state
    torch.testing.assert_close(scores[0], alone)  # padding changes nothing
    torch.testing.assert_close(scores[1], model.value_head(longer[0, 6]).squeeze().detach())


def test_rm_loss_trains_the_head_and_the_backbone(tiny_lm):
    from halos.models.value_head import ValueHeadModel

    model = ValueHeadModel(tiny_lm)
    ids = torch.randint(1, 64, (4, 6), generator=_gen(0))
    mask = torch.ones(4, 6, dtype=torch.long)
    loss_mask = torch.zeros(4, 6, dtype=torch.bool)
    loss_mask[:, 3:] = True
    scores, tokens = model(ids, mask, loss_mask)
    policy = PairedLogps(scores[:2], scores[2:], tokens[:2], tokens[2:])
    out = build_loss("rm")(policy)
    out.losses.mean().backward()
    assert model.value_head.weight.grad is not None
    assert tiny_lm.get_input_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_value_head_save_load_and_score_texts(tiny_lm, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from halos.models.tiny import train_tokenizer
    from halos.models.value_head import (
        VALUE_HEAD_FILE,
        ValueHeadModel,
        load_value_head,
        save_value_head,
        score_texts,
    )

    with pytest.raises(FileNotFoundError, match="no value head"):
        load_value_head(tmp_path)
    tokenizer = train_tokenizer(["the cat sat on the mat", "two plus two is four"] * 20,
                                vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         pad_token_id=tokenizer.pad_token_id)
    model = ValueHeadModel(LlamaForCausalLM(config)).eval()
    model.save_pretrained(tmp_path, state_dict=model.state_dict())  # what the trainer exports
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    path = save_value_head(model.value_head, tmp_path)  # the same file, written directly
    assert path == tmp_path / VALUE_HEAD_FILE
    assert sorted(load_file(str(path))) == ["v_head.summary.bias", "v_head.summary.weight"]
    head = load_value_head(tmp_path)
    torch.testing.assert_close(head.weight, model.value_head.weight)
    torch.testing.assert_close(head.bias, model.value_head.bias)

    prompts, responses = ["two plus two is", "the cat"], [" four", " sat on the mat"]
    loaded = score_texts(tmp_path, prompts, responses, batch_size=1, device="cpu")
    batched = score_texts(tmp_path, prompts, responses, tokenizer, model=model, batch_size=2,
                          device="cpu")
    assert len(loaded) == 2
    torch.testing.assert_close(torch.tensor(loaded), torch.tensor(batched))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_texts(tmp_path, prompts, responses[:1], tokenizer, model=model)
