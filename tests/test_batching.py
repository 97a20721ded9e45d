"""The step plan: deterministic, sharded, bucketed without single-label microbatches."""

from __future__ import annotations

import numpy as np

from halos.train.batching import kl_partners, plan_steps


def _plan(**kw):
    args = dict(micro_batch_size=4, grad_accum=2, world_size=1, epochs=1, seed=0, bucketing=True)
    args.update(kw)
    return plan_steps(**args)


def test_plan_is_deterministic_and_drops_only_incomplete_steps() -> None:
    lengths = list(np.random.default_rng(0).integers(5, 500, size=37))
    plan = _plan(lengths=lengths)
    assert plan == _plan(lengths=lengths)
    assert len(plan) == 37 // 8 and all(len(step) == 2 and all(len(m) == 4 for m in step)
                                        for step in plan)
    used = [i for step in plan for micro in step for i in micro]
    assert len(used) == len(set(used)) == 32


def test_ranks_share_a_step_without_overlap() -> None:
    plan = _plan(lengths=[10] * 64, world_size=2)
    for step in plan:
        rank0, rank1 = step[0::2], step[1::2]
        assert not {i for m in rank0 for i in m} & {i for m in rank1 for i in m}


def test_bucketing_reduces_padding() -> None:
    lengths = list(np.random.default_rng(1).lognormal(4.5, 0.8, size=512).astype(int) + 5)

    def padding(plan):
        real = sum(lengths[i] for step in plan for m in step for i in m)
        padded = sum(len(m) * max(lengths[i] for i in m) for step in plan for m in step)
        return 1 - real / padded

    assert padding(_plan(lengths=lengths)) < 0.5 * padding(_plan(lengths=lengths, bucketing=False))


def test_bucketing_keeps_both_labels_in_microbatches() -> None:
    """A label that is always shorter (refusals) must not be bucketed into its own batches."""
    labels = [i % 2 == 0 for i in range(320)]
    lengths = [40 + i % 7 if flag else 8 + i % 3 for i, flag in enumerate(labels)]
    plan = _plan(lengths=lengths, labels=labels)
    single = sum(len({labels[i] for i in m}) == 1 for step in plan for m in step)
    assert single == 0


def test_kl_partners_are_a_derangement() -> None:
    for n in (2, 3, 5, 8, 101):
        partners = kl_partners(n, seed=3)
        assert sorted(partners) == list(range(n))
        assert all(p != i for i, p in enumerate(partners))


def test_groups_share_a_microbatch_and_keep_both_labels_in_it() -> None:
    """A pair's two halves (one group: same prompt, one label each) are cut into one microbatch,
    with or without bucketing; the plan stays deterministic and uses each example once."""
    rng = np.random.default_rng(2)
    lengths = [int(x) for x in rng.integers(5, 500, size=202)]
    groups = [[2 * k, 2 * k + 1] for k in range(100)] + [[200], [201]]
    labels = [i % 2 == 0 for i in range(202)]
    for bucketing in (False, True):
        plan = _plan(lengths=lengths, labels=labels, groups=groups, bucketing=bucketing)
        assert plan == _plan(lengths=lengths, labels=labels, groups=groups, bucketing=bucketing)
        micro = [m for step in plan for m in step]
        assert len(micro) == 50 and all(len(m) == 4 for m in micro)
        used = [i for m in micro for i in m]
        assert len(used) == len(set(used))
        together = sum(sum(i in m for i in g) in (0, 2) for g in groups[:100] for m in micro)
        assert together == 100 * len(micro)


def test_a_packed_view_groups_the_halves_of_each_pair() -> None:
    """Halves of one pair (ids as halos.data.convert makes them, same prompt) form a group;
    other examples of a prompt stay alone, and so does a half whose prompt was cut otherwise."""
    from halos.data.types import TokenizedCompletion
    from halos.train.dataview import DataView

    def half(pair: str, which: str, prompt: list[int]) -> TokenizedCompletion:
        return TokenizedCompletion(f"{pair}/{which}", prompt, [3], which == "chosen")

    examples = [half("a", "chosen", [1]), half("b", "rejected", [2]), half("a", "rejected", [1]),
                half("b", "chosen", [2, 9]), TokenizedCompletion("c", [1], [4], True),
                TokenizedCompletion("d", [1], [5], False)]
    view = DataView(examples, "unpaired", 0, packing=True)
    assert view.prompt_groups() == [[0, 2], [1], [3], [4], [5]]
    assert DataView(examples, "unpaired", 0, packing=False).prompt_groups() is None
    assert DataView(examples[4:], "unpaired", 0, packing=True).prompt_groups() is None
