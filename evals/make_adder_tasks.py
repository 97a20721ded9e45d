"""Write the lm-eval data files of the local "helpful adder" tasks (deterministic).

    python evals/make_adder_tasks.py            # rewrites evals/tasks/data/adder_{mc,gen}.jsonl

Both files use only the synthetic task's *held-out* facts (sums never seen in preference pairs)
of the default tiny suite (`halos.data.synthetic.build(seed=0)`), one row per fact:

* adder_mc: the question and four replies in the preferred style: the right sum, the sum off by
  one either way, and a refusal; lm-eval scores which one the model finds most likely.
* adder_gen: the question and the sum; lm-eval generates a reply and checks its last number.

The YAMLs next to this script name these files relative to themselves; `halos eval lm-eval`
resolves such paths against the YAML's folder (lm-eval alone would use the current directory).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from halos.data import synthetic
from halos.files import write_jsonl

HERE = Path(__file__).resolve().parent


def heldout_facts(seed: int = 0, max_operand: int = 19) -> list[tuple[int, int]]:
    """The (a, b) facts that `synthetic.build(seed)` holds out of the preference pairs."""
    splits = synthetic.build(seed=seed, max_operand=max_operand, n_train=0, n_test=0, n_sft=0,
                             n_prompts=10**9)
    return sorted({(row["a"], row["b"]) for row in splits["prompts"]})


def rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"adder-tasks-{seed}")
    mc, gen = [], []
    for a, b in heldout_facts(seed):
        s = a + b
        question = rng.choice(synthetic.QUESTIONS).format(a=a, b=b)
        answer = rng.choice(synthetic.ANSWERS)
        low = s - 1 if s >= 1 else s + 2
        choices = [answer.format(a=a, b=b, s=s), answer.format(a=a, b=b, s=s + 1),
                   answer.format(a=a, b=b, s=low), rng.choice(synthetic.REFUSALS)]
        order = list(range(len(choices)))
        rng.shuffle(order)
        mc.append({"id": f"mc-{a}-{b}", "question": question, "a": a, "b": b,
                   "choices": [choices[i] for i in order], "gold": order.index(0)})
        gen.append({"id": f"gen-{a}-{b}", "question": rng.choice(synthetic.QUESTIONS).format(a=a, b=b),
                    "a": a, "b": b, "answer": str(s)})
    return mc, gen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--out", type=Path, default=HERE / "tasks" / "data")
    args = parser.parse_args()
    mc, gen = rows(args.seed)
    write_jsonl(args.out / "adder_mc.jsonl", mc)
    write_jsonl(args.out / "adder_gen.jsonl", gen)
    print(f"wrote {len(mc)} multiple-choice and {len(gen)} generation rows to {args.out}")


if __name__ == "__main__":
    main()
