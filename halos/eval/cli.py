"""The `halos sample`, `halos eval …` and `halos report` commands (wired in halos/cli.py).

    halos sample --model DIR --prompts data/D/prompts.jsonl --out samples.jsonl [--n 200]
                 [--temperature 0.0] [--top-p 1.0] [--max-new-tokens 48] [--seed 0] [--batch-size 32]
    halos eval preference --model DIR --data data/D --out preference.json
                 [--ref-logps results/M/D/ref_logps.pt] [--examples 400] [--batch-size 16]
    halos eval judge --samples aligned.jsonl --baseline sft_samples.jsonl --out judge.json
                 [--judge synthetic|rm:MODEL_DIR|llm] [--against-chosen data/D/test.jsonl]
                 [--seed 0] [--judge-workers 4] [--judge-prompt FILE]
    halos eval lm-eval --model DIR --tasks evals/tasks/adder_mc.yaml,evals/tasks/adder_gen.yaml
                 --out lm_eval.json [--apply-chat-template] [--limit N] [--batch-size 8]
                 [--num-fewshot K] [--seed 0]
    halos report --runs RUN_DIR... --out results/SUITE/leaderboard.md [--baseline-loss sft]
                 [--plots DIR] [--require-win dpo,kto]

Each function takes the arguments after the command word and returns an exit code; bad input
raises ValueError / FileNotFoundError with a message naming the option (the CLI prints it and
exits 2).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _offline() -> None:
    """Everything but hub-named lm-eval tasks works on local files: never wait on Hub retries."""
    for flag in OFFLINE_FLAGS:
        os.environ[flag] = "1"


def _write(out: str, payload: dict) -> None:
    from halos.files import write_json

    write_json(out, payload)
    print(f"[halos] wrote {out}", flush=True)


def main_sample(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="halos sample", description=(
        "Sample completions for held-out prompts, rendered as training rendered them (chat "
        "template, the loss's prompt suffix). Greedy when --temperature is 0; seeded."))
    parser.add_argument("--model", required=True, help="model folder (e.g. results/M/D/dpo/model)")
    parser.add_argument("--prompts", required=True, help="JSONL with id and prompt (messages)")
    parser.add_argument("--out", required=True, help="output JSONL of samples")
    parser.add_argument("--n", type=int, default=200, help="first N prompts (default 200)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(list(argv))
    _offline()
    from halos.eval.sample import sample

    sample(args.model, args.prompts, args.out, n=args.n, temperature=args.temperature,
           top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
           batch_size=args.batch_size)
    return 0


def _preference(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="halos eval preference", description=(
        "Reward and log-prob accuracy/margins of a model on the held-out preference pairs."))
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="prepared dataset folder (test.jsonl)")
    parser.add_argument("--out", required=True, help="output JSON")
    parser.add_argument("--ref-logps", help="reference log-probs (ref_logps.pt) for implicit rewards")
    parser.add_argument("--examples", type=int, default=400, help="first N test pairs (0 = all)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(list(argv))
    _offline()
    from halos.eval.preference import preference_metrics

    _write(args.out, preference_metrics(args.model, args.data, ref_logps=args.ref_logps,
                                        examples=args.examples, batch_size=args.batch_size))
    return 0


def _judge(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="halos eval judge", description=(
        "Judged win rate of --samples against --baseline (same prompt ids), ties as half, with "
        "a 90%% Wilson interval and a two-sided sign-test p-value. The LLM judge reads "
        "HALOS_JUDGE_URL, HALOS_JUDGE_MODEL and HALOS_JUDGE_API_KEY from the environment."))
    parser.add_argument("--samples", required=True, help="the evaluated model's samples (JSONL)")
    parser.add_argument("--baseline", required=True, help="the baseline's (SFT) samples (JSONL)")
    parser.add_argument("--out", required=True, help="output JSON")
    parser.add_argument("--judge", default="synthetic", help="synthetic (default), rm:MODEL_DIR or llm")
    parser.add_argument("--against-chosen", help="dataset file with chosen replies (test.jsonl) "
                        "to also compare against, matched by id then by prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LLM judge's A/B order")
    parser.add_argument("--judge-workers", type=int, default=4, help="parallel LLM judge requests")
    parser.add_argument("--judge-prompt", help="LLM judge prompt template (default "
                        "evals/judge/pairwise.txt)")
    args = parser.parse_args(list(argv))
    if args.judge != "llm":
        _offline()
    from halos.eval.judge import judge_samples
    from halos.eval.judges import make_judge

    judge = make_judge(args.judge, seed=args.seed, workers=args.judge_workers,
                       prompt_file=args.judge_prompt)
    result = judge_samples(judge, args.samples, args.baseline, args.against_chosen)
    _write(args.out, result)
    print(f"[halos] {result['judge']}: win rate {result['win_rate']:.3f} "
          f"(90% CI {result['ci90'][0]:.3f}-{result['ci90'][1]:.3f}, p={result['p_value']:.3g}; "
          f"{result['wins']}W/{result['ties']}T/{result['losses']}L)", flush=True)
    return 0


def _lm_eval(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="halos eval lm-eval", description=(
        "lm-evaluation-harness on a saved checkpoint: hub task names or local task YAMLs "
        "(data paths relative to the YAML), comma-separated."))
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", required=True, help="comma-separated task names or YAML files")
    parser.add_argument("--out", required=True, help="output JSON")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="render prompts with the model's chat template (+ loss suffix)")
    parser.add_argument("--limit", type=int, help="at most N examples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    from halos.eval.lmeval import run_lm_eval

    _write(args.out, run_lm_eval(args.model, args.tasks, apply_chat_template=args.apply_chat_template,
                                 limit=args.limit, batch_size=args.batch_size,
                                 num_fewshot=args.num_fewshot, seed=args.seed))
    return 0


EVALS = {"preference": _preference, "judge": _judge, "lm-eval": _lm_eval}


def main_eval(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: halos eval {" + ",".join(EVALS) + "} ...\n\n" + __doc__.split("\n\n")[1])
        return 0 if argv else 2
    if argv[0] not in EVALS:
        raise ValueError(f"unknown evaluation {argv[0]!r}; choose from {sorted(EVALS)}")
    return EVALS[argv[0]](argv[1:])


def main_report(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="halos report", description=(
        "Merge the eval/*.json of a suite's runs into a leaderboard (.md and .csv) and plots."))
    runs = parser.add_mutually_exclusive_group(required=True)
    runs.add_argument("--runs", nargs="+", metavar="RUN_DIR",
                      help="run folders results/{suite}/{model}/{dataset}/{loss} (the DAG's)")
    runs.add_argument("--results", metavar="SUITE_DIR",
                      help="every run under one suite's folder, e.g. results/tiny")
    parser.add_argument("--out", required=True, help="e.g. results/tiny/leaderboard.md")
    parser.add_argument("--baseline-loss", default="sft", help="the loss others are judged against")
    parser.add_argument("--plots", help="plot folder (default: plots/ beside --out)")
    parser.add_argument("--require-win", help="comma-separated losses that must beat the "
                        "baseline (90%% CI above 0.5) in every judged row, else exit 2 (for CI)")
    args = parser.parse_args(list(argv))
    from halos.eval.report import report, run_dirs_under

    run_dirs = args.runs or run_dirs_under(args.results)
    required = [x.strip() for x in (args.require_win or "").split(",") if x.strip()]
    made = report(run_dirs, args.out, args.baseline_loss, args.plots, required)
    print(f"[halos] leaderboard of {made['rows']} rows -> {made['markdown']}, {made['csv']}; "
          f"{len(made['plots'])} plots", flush=True)
    return 0
