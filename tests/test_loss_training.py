"""Every loss trains through the one trainer, and its key metric moves the right way.

One SFT model and one reference log-probs file are shared by the module; every loss then runs
`halos align` (the real CLI, in a subprocess) for a few dozen steps on a small preference set,
two runs at a time. The preference set is the synthetic adder's prompts and correct answers
against refusals: a preference the tiny model can pick up in ~30 steps on held-out prompts (which
sum is right is not learnable that fast), so the assertions have room and are not coin flips.

- reference-based losses: held-out reward accuracy > 0.5 and a positive reward margin (at the SFT
  model, rewards are exactly 0);
- reference-free losses: the held-out chosen-minus-rejected log-prob margin grows over the SFT
  model's (read from the reference file, whose model *is* the SFT model);
- KTO on paired data (converted) and on natively unpaired data: desirable rewards above
  undesirable ones; CSFT: its control tokens exist and steer the model; RM: `halos score` ranks
  chosen above rejected.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import FAST, metrics, run_halos

from halos.cli import main as halos_main
from halos.data.prepare import read_rows
from halos.files import write_jsonl
from halos.losses import LOSSES

EVAL_EXAMPLES = 128  # the whole test split, paired (64 pairs) and unpaired (128 rows)
TRAIN_PAIRS, TEST_PAIRS = 320, 64
STEPS = "30"
ALIGN = (*FAST, "--micro-batch-size", "8", "--eval-examples", str(EVAL_EXAMPLES),
         "--max-steps", STEPS)

REFERENCE_BASED = ["dpo", "cdpo", "robust", "ipo"]
REFERENCE_FREE = ["slic", "cpo", "orpo", "simpo"]

# What `halos losses` must offer (the issue's twelve) with their defaults.
HYPERPARAMETERS = {
    "sft": {}, "csft": {}, "rm": {},
    "dpo": {"beta": 0.1, "rpo_alpha": None},
    "cdpo": {"beta": 0.1, "label_smoothing": 0.2, "rpo_alpha": None},
    "robust": {"beta": 0.1, "label_smoothing": 0.2, "rpo_alpha": None},
    "ipo": {"tau": 0.1},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "slic": {"delta": 1.0, "lambda_coef": 0.1},
    "cpo": {"beta": 0.1, "cpo_alpha": 1.0},
    "orpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 1.0},
    "ppo": {"cliprange": 0.5, "gamma": 0.99, "lam": 0.95, "critic_coef": 0.01, "kl_coef": 0.1},
}


def fast_option(flag: str) -> int:
    return int(FAST[FAST.index(flag) + 1])


# ============================================================================ --help (fast)
def align_help(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        halos_main(["align", *argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def loss_section(text: str, loss: str) -> str:
    """The help text of the loss's hyperparameter group (up to the next group or the end)."""
    match = re.search(rf"^hyperparameters of loss '{loss}' \(\w+\):\n((?:[ \t]+.*\n|\n)*)",
                      text + "\n", flags=re.MULTILINE)
    assert match, f"no hyperparameter group for {loss!r} in:\n{text}"
    return match.group(1)


def test_the_issue_losses_and_their_defaults_are_registered() -> None:
    assert set(LOSSES) == set(HYPERPARAMETERS)
    for name, expected in HYPERPARAMETERS.items():
        got = {k: p.default for k, p in LOSSES[name].hyperparameters().items()}
        assert got == expected, name


@pytest.mark.parametrize("loss", sorted(HYPERPARAMETERS))
def test_align_help_lists_the_loss_hyperparameters_with_defaults(
        loss: str, capsys: pytest.CaptureFixture) -> None:
    text = align_help(capsys, "--loss", loss)
    all_flags = {"--" + n.replace("_", "-") for params in HYPERPARAMETERS.values() for n in params}
    if not HYPERPARAMETERS[loss]:
        # argparse prints no empty group: no loss hyperparameter flag at all.
        assert "hyperparameters of loss" not in text
        assert not [f for f in all_flags if re.search(rf"^\s+{f}\b", text, re.MULTILINE)]
        return
    section = loss_section(text, loss)
    options = re.findall(r"^\s+(--[\w-]+)", section, flags=re.MULTILINE)
    expected = HYPERPARAMETERS[loss]
    assert options == ["--" + name.replace("_", "-") for name in expected]
    for name, default in expected.items():
        flag = "--" + name.replace("_", "-")
        # "--beta BETA   default: 0.1" (argparse may wrap the help onto the next line).
        assert re.search(rf"{flag} \w+\s+default: {re.escape(repr(default))}\n", section), \
            (flag, section)


def test_align_help_without_loss_shows_dpo_and_a_yaml_loss_is_honoured(
        capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert "--beta BETA" in loss_section(align_help(capsys), "dpo")
    config = tmp_path / "run.yaml"
    config.write_text("loss: simpo\n")
    section = loss_section(align_help(capsys, "--config", str(config)), "simpo")
    assert "--simpo-gamma" in section and "--tau" not in section
    # The CLI wins over the YAML file.
    assert "--tau TAU" in loss_section(align_help(capsys, "--config", str(config), "--loss", "ipo"),
                                       "ipo")


def test_align_help_for_an_unknown_loss_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert halos_main(["align", "--loss", "no-such-loss", "--help"]) == 2
    err = capsys.readouterr().err
    assert "unknown loss 'no-such-loss'" in err and "'simpo'" in err


# ============================================================================ data and models
def refusal_pairs(rows: list[dict]) -> list[dict]:
    """The adder's pairs with a refusal as the rejected response (a new id for the new pair)."""
    from halos.data.rows import assistant, paired_row
    from halos.data.synthetic import REFUSALS

    return [paired_row(r["source"], r["prompt"], r["chosen"],
                       [assistant(REFUSALS[i % len(REFUSALS)])]) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def pref_data(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small paired preference set: train on seen facts, test on held-out ones."""
    out = tmp_path_factory.mktemp("pref") / "answers-vs-refusals"
    out.mkdir()
    for split, n in (("train", TRAIN_PAIRS), ("test", TEST_PAIRS)):
        write_jsonl(out / f"{split}.jsonl", refusal_pairs(read_rows(synthetic_data / f"{split}.jsonl")[:n]))
    return out


@pytest.fixture(scope="module")
def unpaired_data(pref_data: Path) -> Path:
    """The same examples as a natively unpaired dataset (completion + label rows)."""
    from halos.data.convert import paired_to_unpaired

    out = pref_data.parent / "unpaired"
    out.mkdir()
    for split in ("train", "test"):
        rows = paired_to_unpaired(read_rows(pref_data / f"{split}.jsonl"), seed=1)
        write_jsonl(out / f"{split}.jsonl", rows)
    assert {"prompt", "completion", "label"} <= set(rows[0]) and "chosen" not in rows[0]
    return out


@pytest.fixture(scope="module")
def reference(sft_model: Path, pref_data: Path) -> Path:
    out = pref_data.parent / "ref_logps.pt"
    run_halos("ref-logps", "--model", sft_model, "--data", pref_data, "--out", out, *FAST,
              "--micro-batch-size", "64")
    return out


# ============================================================================ the runs
@dataclass
class Run:
    out: Path
    stdout: str


# job name -> (loss, extra `halos align` options). All start from the SFT model, lr 1e-4 (tiny
# models tolerate 1e-4..1e-3 for DPO-like losses).
JOBS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{name: (name, ("--learning-rate", "1e-4")) for name in REFERENCE_BASED + REFERENCE_FREE},
    "kto": ("kto", ("--learning-rate", "1e-4")),
    "kto-unpaired": ("kto", ("--learning-rate", "1e-4", "--desirable-weight", "3")),
    "rm": ("rm", ("--learning-rate", "1e-4")),
    "ppo": ("ppo", ("--learning-rate", "1e-4")),
    # CSFT has to learn what two brand-new tokens mean: a higher rate, a few more steps, and no
    # length bucketing (refusals are short, so bucketing makes most microbatches one-label).
    "csft": ("csft", ("--learning-rate", "3e-3", "--max-steps", "40", "--no-length-bucketing")),
}


LONGEST = ("kto-unpaired", "rm", "csft")  # more than one process, or more steps


def _run_job(job: str, sft_model: Path, pref_data: Path, reference: Path,
             unpaired_data: Path, root: Path) -> Run:
    loss, extra = JOBS[job]
    out = root / job
    data, ref = pref_data, reference
    if job == "kto-unpaired":  # natively unpaired data gets its own reference file
        data, ref = unpaired_data, root / "unpaired_ref_logps.pt"
        run_halos("ref-logps", "--model", sft_model, "--data", data, "--out", ref, *FAST,
                  "--micro-batch-size", "64")
    result = run_halos("align", "--loss", loss, "--model", sft_model, "--data", data,
                       "--ref-logps", ref, "--out", out, *ALIGN, *extra)
    if job == "rm":
        run_halos("score", "--model", out / "model", "--data", pref_data / "test.jsonl",
                  "--out", out / "scores.jsonl", "--max-length", str(fast_option("--max-length")))
    return Run(out, result.stdout + result.stderr)


class Runs:
    """Alignment runs in a pool of two processes; `get(job)` waits for one."""

    def __init__(self, launch, jobs: list[str]):
        workers = max(1, min(2, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.launch = launch
        self.futures: dict[str, Future] = {}
        for job in jobs:
            self.submit(job)

    def submit(self, job: str) -> Future:
        if job not in self.futures:
            self.futures[job] = self.pool.submit(self.launch, job)
        return self.futures[job]

    def get(self, job: str) -> Run:
        return self.submit(job).result()


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, sft_model: Path, pref_data: Path, reference: Path,
         unpaired_data: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("align")
    # Start every run a selected test of this module needs at once (longest first).
    wanted = [item.callspec.params["job"] for item in request.session.items
              if getattr(item, "module", None) is request.module
              and "job" in getattr(getattr(item, "callspec", None), "params", {})]
    wanted = sorted(dict.fromkeys(wanted), key=lambda job: job not in LONGEST)
    pool = Runs(lambda job: _run_job(job, sft_model, pref_data, reference, unpaired_data, root),
                wanted)
    yield pool
    pool.pool.shutdown(wait=True, cancel_futures=True)


def sft_test_margin(sft_model: Path, pref_data: Path, reference: Path, average: bool) -> float:
    """The SFT model's mean chosen-minus-rejected log-prob over the held-out pairs the runs
    evaluate, read from the reference file (computed with that very model)."""
    from transformers import AutoTokenizer

    from halos.config import TrainConfig
    from halos.losses import build_loss
    from halos.train.dataview import load_view
    from halos.train.reference import ReferenceLogps

    cfg = TrainConfig(model=str(sft_model), data=str(pref_data), out="unused",
                      eval_examples=EVAL_EXAMPLES, max_length=fast_option("--max-length"),
                      max_prompt_length=fast_option("--max-prompt-length"))
    view = load_view(cfg, build_loss("dpo"), AutoTokenizer.from_pretrained(sft_model), "test")
    assert len(view) == TEST_PAIRS
    batch = view.batch(list(range(len(view))))
    sums, tokens = ReferenceLogps(reference).lookup(batch.keys)
    logps = sums / tokens.clamp(min=1) if average else sums
    return float((logps[: batch.size] - logps[batch.size :]).mean())


# ============================================================================ per-loss tests
@pytest.mark.slow
def test_sft_lowers_the_held_out_nll(sft_model: Path) -> None:
    first, final = metrics(sft_model.parent, "train")[0], metrics(sft_model.parent, "eval")[-1]
    assert final["nll"] < first["nll"] - 1.0, (first, final)


@pytest.mark.slow
@pytest.mark.parametrize("job", REFERENCE_BASED)
def test_reference_based_loss_raises_held_out_reward_accuracy(job: str, runs: Runs) -> None:
    run = runs.get(job)
    first, final = metrics(run.out, "train")[0], metrics(run.out, "eval")[-1]
    # Step 1 scores the SFT model itself: its rewards against the reference are 0.
    assert abs(first["rewards/margin"]) < 1e-4 and abs(first["rewards/chosen"]) < 1e-4, first
    assert final["rewards/accuracy"] > 0.5, final
    assert final["rewards/margin"] > 0, final
    assert final["rewards/chosen"] > final["rewards/rejected"], final
    assert len(metrics(run.out, "train")) == int(STEPS)
    summary = json.loads((run.out / "model" / "halos_training.json").read_text())
    assert summary["loss"] == job and summary["final_eval"] == {
        k: v for k, v in final.items() if k not in ("step", "split", "time")}


@pytest.mark.slow
@pytest.mark.parametrize("job", REFERENCE_FREE)
def test_reference_free_loss_grows_the_held_out_logp_margin(job: str, runs: Runs,
                                                            sft_model: Path, pref_data: Path,
                                                            reference: Path) -> None:
    run = runs.get(job)
    average = LOSSES[job].average_logps
    before = sft_test_margin(sft_model, pref_data, reference, average)
    final = metrics(run.out, "eval")[-1]
    after = final["logps/margin"]
    assert after - before > 0.1 * abs(before), (job, before, after, final)
    assert final["logps/chosen"] > final["logps/rejected"], final
    assert len(metrics(run.out, "train")) == int(STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["kto"])
def test_kto_on_paired_data_converts_to_unpaired_and_trains(job: str, runs: Runs) -> None:
    run = runs.get(job)
    # Each pair became a desirable and an undesirable example.
    assert f"train (unpaired): tokenized {2 * TRAIN_PAIRS}:" in run.stdout
    assert f"test (unpaired): tokenized {2 * TEST_PAIRS}:" in run.stdout
    assert "warning: kto" not in run.stdout  # 1·nD / (1·nU) = 1 is in the recommended range
    first, final = metrics(run.out, "train")[0], metrics(run.out, "eval")[-1]
    assert first["rewards/desirable"] == pytest.approx(0, abs=1e-4)
    assert first["rewards/undesirable"] == pytest.approx(0, abs=1e-4)
    assert final["rewards/desirable_count"] == final["rewards/undesirable_count"] == TEST_PAIRS
    assert final["rewards/desirable"] > final["rewards/undesirable"], final
    assert final["kl"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("job", ["kto-unpaired"])
def test_kto_on_unpaired_data_trains_and_warns_about_the_weight_ratio(job: str,
                                                                      runs: Runs) -> None:
    run = runs.get(job)
    n = 2 * TRAIN_PAIRS
    assert f"train (unpaired): tokenized {n}:" in run.stdout
    # --desirable-weight 3 on balanced data: λD·nD / (λU·nU) = 3, outside [1, 4/3].
    warning = (f"[halos] warning: kto: desirable_weight·nD / (undesirable_weight·nU) = "
               f"3.0·{n // 2} / (1.0·{n // 2}) = 3 is outside the recommended [1, 4/3]; "
               f"e.g. set desirable_weight=1.33 or undesirable_weight=2.25")
    assert warning in run.stdout
    summary = json.loads((run.out / "model" / "halos_training.json").read_text())
    assert summary["config"]["loss_params"] == {"desirable_weight": 3.0}
    final = metrics(run.out, "eval")[-1]
    assert final["rewards/desirable"] > final["rewards/undesirable"], final


@pytest.mark.slow
@pytest.mark.parametrize("job", ["rm"])
def test_reward_model_writes_its_head_and_scores_chosen_above_rejected(job: str, runs: Runs,
                                                                      sft_model: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    run = runs.get(job)
    first, final = metrics(run.out, "train")[0], metrics(run.out, "eval")[-1]
    assert final["rewards/accuracy"] > 0.5 and final["rewards/margin"] > 0, final
    assert final["loss"] < first["loss"], (first, final)
    head = load_file(run.out / "model" / "value_head.safetensors")
    hidden = AutoConfig.from_pretrained(sft_model).hidden_size
    assert head["v_head.summary.weight"].shape == (1, hidden)
    assert head["v_head.summary.bias"].shape == (1,)
    scores = [json.loads(line) for line in (run.out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == TEST_PAIRS
    wins = sum(s["chosen"] > s["rejected"] for s in scores) / len(scores)
    assert wins > 0.5, scores[:5]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["ppo"])
def test_offline_ppo_raises_desirable_over_undesirable_log_ratios(job: str, runs: Runs) -> None:
    run = runs.get(job)
    assert f"train (unpaired): tokenized {2 * TRAIN_PAIRS}:" in run.stdout  # pairs, converted
    first, final = metrics(run.out, "train")[0], metrics(run.out, "eval")[-1]
    # Step 1 scores the SFT model itself: ratio 1, so the policy loss is −mean(whitened Â) = 0.
    assert abs(first["loss/policy"]) < 1e-4 and abs(first["objective/kl"]) < 1e-3, first
    assert final["logratio/desirable"] > 0 > final["logratio/undesirable"], final
    assert (run.out / "model" / "value_head.safetensors").is_file()


def _embedding(model_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(model_dir / "model.safetensors")
    return next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))


def _completion_logps(model_dir: Path, sequences: list[tuple[list[int], list[int]]],
                      pad_id: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from halos.train.batching import collate
    from halos.train.logps import CausalLMLogps

    scorer = CausalLMLogps(AutoModelForCausalLM.from_pretrained(model_dir)).eval()
    batch = collate(sequences, pad_id, "sft", len(sequences))
    with torch.no_grad():
        sums, _ = scorer(batch.input_ids, batch.attention_mask, batch.loss_mask)
    return sums


@pytest.mark.slow
@pytest.mark.parametrize("job", ["csft"])
def test_csft_adds_control_tokens_that_steer_the_model(job: str, runs: Runs, sft_model: Path,
                                                      pref_data: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from halos.config import TrainConfig
    from halos.losses import build_loss
    from halos.losses.csft import BAD, GOOD
    from halos.train.dataview import load_view

    run = runs.get(job)
    model = run.out / "model"
    tokenizer, base = AutoTokenizer.from_pretrained(model), AutoTokenizer.from_pretrained(sft_model)
    assert len(tokenizer) == len(base) + 2
    good, bad = tokenizer.convert_tokens_to_ids([GOOD, BAD])
    assert {good, bad} == {len(base), len(base) + 1}
    assert tokenizer.encode(GOOD + BAD, add_special_tokens=False) == [good, bad]
    assert AutoConfig.from_pretrained(model).vocab_size == len(tokenizer)
    embedding = _embedding(model)
    base_embedding = _embedding(sft_model)
    assert embedding.shape == (base_embedding.shape[0] + 2, base_embedding.shape[1])
    assert "train (unpaired): tokenized" in run.stdout  # paired data, converted

    # Held-out prompts (the run's own tokenization, with the control token it appended):
    # each completion is likelier under its own control token than under the other one.
    cfg = TrainConfig(model=str(model), data=str(pref_data), out="unused",
                      eval_examples=EVAL_EXAMPLES, max_length=fast_option("--max-length"),
                      max_prompt_length=fast_option("--max-prompt-length"))
    examples = load_view(cfg, build_loss("csft"), tokenizer, "test").examples
    assert all(e.prompt_ids[-1] == (good if e.desirable else bad) for e in examples)
    own = [(e.prompt_ids, e.completion_ids) for e in examples]
    other = [(e.prompt_ids[:-1] + [bad if e.desirable else good], e.completion_ids)
             for e in examples]
    gain = (_completion_logps(model, own, tokenizer.pad_token_id)
            - _completion_logps(model, other, tokenizer.pad_token_id))
    desirable = torch.tensor([e.desirable for e in examples])
    assert gain[desirable].mean() > 0.25 and gain[~desirable].mean() > 0.25, gain
    final = metrics(run.out, "eval")[-1]
    assert final["nll"] < metrics(run.out, "train")[0]["nll"], final


# ============================================================================ data kinds
def test_a_paired_loss_refuses_unpaired_data(unpaired_data: Path) -> None:
    from halos.config import TrainConfig
    from halos.train.dataview import read_split_rows

    cfg = TrainConfig(model="unused", data=str(unpaired_data), out="unused")
    with pytest.raises(ValueError, match="needs preference pairs; choose an unpaired loss"):
        read_split_rows(unpaired_data, "train", "paired", cfg)
    assert {r["label"] for r in read_split_rows(unpaired_data, "train", "unpaired", cfg)} == {
        "desirable", "undesirable"}


@pytest.mark.slow
def test_kto_runs_on_prefixes_of_the_scored_splits(sft_model: Path, pref_data: Path,
                                                   reference: Path) -> None:
    """Regression: KTO's mismatched KL pairs of a prefix of a split (--max-examples,
    --eval-examples smaller than the split) are among those `halos ref-logps` scored for the
    whole split (they used to depend on the prefix length, and the run was refused)."""
    from transformers import AutoTokenizer

    from halos.config import TrainConfig
    from halos.losses import build_loss
    from halos.train.dataview import load_view
    from halos.train.run import open_reference

    kto = build_loss("kto")
    cfg = TrainConfig(model=str(sft_model), data=str(pref_data), out="unused",
                      ref_logps=str(reference), max_examples=100, eval_examples=64,
                      max_length=fast_option("--max-length"),
                      max_prompt_length=fast_option("--max-prompt-length"))
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    views = [load_view(cfg, kto, tokenizer, split) for split in ("train", "test")]
    assert [len(v) for v in views] == [100, 64]
    assert all(v.kind == "unpaired" and len(v.sequences()) == 2 * len(v) for v in views)
    assert open_reference(cfg, kto, views) is not None  # every KL pair is in the file
