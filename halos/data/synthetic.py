"""The embedded task: a seeded "helpful adder" preference dataset and its program judge.

Prompts ask for a + b (a, b in 0..max_operand, several phrasings). Preferred = a sentence stating
the right sum; dispreferred = the same sentence with the sum off by -2, -1, +1 or +2 (both sides,
or DPO learns "smaller is better"), or a refusal. Preference pairs never use the held-out facts
(a, b); the test pairs and `prompts.jsonl` use only those. The SFT mix is noisy on purpose (45%
correct, 5% off by one, 50% refusals): like an over-cautious SFT model trained on noisy
demonstrations, the SFT model refuses (greedy), and the preference pairs (1 in 5 rejected answers
is a refusal, the rest wrong sums) teach it to answer, and to answer right.
Texts are short so a ~1-4M parameter model learns the format in about a minute.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

from halos.data.rows import assistant, paired_row, stable_id, unpaired_row, user
from halos.files import atomic_dir, write_json, write_jsonl

SOURCE = "synthetic/adder"
QUESTIONS = (
    "What is {a} plus {b}?",
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Please compute {a} + {b}.",
    "What do you get if you add {a} and {b}?",
)
ANSWERS = (
    "{a} plus {b} is {s}.",
    "The answer is {s}.",
    "{a} + {b} = {s}.",
    "Sure! The sum is {s}.",
)
REFUSALS = (
    "Sorry, I can't help with that.",
    "I don't know.",
    "I would rather not do math right now.",
)
WRONG_OFFSETS = (-2, -1, 1, 2)
SFT_MIX = {"correct": 0.45, "off_by_one": 0.05, "refusal": 0.50}
NUMBER = re.compile(r"-?\d+")


# --- the judge ----------------------------------------------------------------------------------

def operands(prompt_messages: list[dict]) -> tuple[int, int]:
    """The two numbers of the last user message; ValueError if it is not an adder prompt."""
    last = next(m["content"] for m in reversed(prompt_messages) if m["role"] == "user")
    numbers = [int(n) for n in NUMBER.findall(last)]
    if len(numbers) != 2:
        raise ValueError(f"not an adder prompt (needs exactly two numbers): {last!r}")
    return numbers[0], numbers[1]


def judge(prompt_messages: list[dict], completion_text: str) -> float:
    """1.0 if the completion states the right sum (its last number, and no number other than the
    operands and the sum), else 0.0: wrong sums, refusals and empty answers lose."""
    a, b = operands(prompt_messages)
    numbers = [int(n) for n in NUMBER.findall(completion_text)]
    if not numbers or numbers[-1] != a + b:
        return 0.0
    return 1.0 if set(numbers) <= {a, b, a + b} else 0.0


def compare(prompt_messages: list[dict], completion_a: str, completion_b: str) -> float:
    """Pairwise verdict for win-rates: 1.0 if A wins, 0.0 if B wins, 0.5 for a tie."""
    delta = judge(prompt_messages, completion_a) - judge(prompt_messages, completion_b)
    return 0.5 + 0.5 * delta


# --- the generator ------------------------------------------------------------------------------

def _question(rng: random.Random, a: int, b: int) -> list[dict]:
    return [user(rng.choice(QUESTIONS).format(a=a, b=b))]


def _wrong(rng: random.Random, a: int, b: int, answer: str) -> str:
    """The preferred sentence with a wrong sum (either side), or a refusal."""
    if rng.random() < 0.2:
        return rng.choice(REFUSALS)
    offset = rng.choice(WRONG_OFFSETS)
    wrong = a + b + offset if a + b + offset >= 0 else a + b - offset
    return answer.format(a=a, b=b, s=wrong)


def _pairs(rng: random.Random, facts: list[tuple[int, int]], n: int) -> list[dict]:
    rows: dict[str, dict] = {}
    while len(rows) < n:
        a, b = rng.choice(facts)
        answer = rng.choice(ANSWERS)
        row = paired_row(SOURCE, _question(rng, a, b), [assistant(answer.format(a=a, b=b, s=a + b))],
                         [assistant(_wrong(rng, a, b, answer))])
        rows.setdefault(row["id"], row)
    return list(rows.values())


def _sft_completion(rng: random.Random, a: int, b: int, mix: dict[str, float]) -> str:
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "refusal":
        return rng.choice(REFUSALS)
    total = a + b + (1 if kind == "off_by_one" else 0)
    return rng.choice(ANSWERS).format(a=a, b=b, s=total)


def _sft(rng: random.Random, facts: list[tuple[int, int]], n: int, mix: dict[str, float]
         ) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = rng.choice(facts)
        prompt = _question(rng, a, b)
        completion = [assistant(_sft_completion(rng, a, b, mix))]
        # SFT rows repeat on purpose; the index keeps their ids unique.
        rows.append(unpaired_row(SOURCE, prompt, completion, "desirable",
                                 id=stable_id(SOURCE, "sft", i, prompt, completion)))
    return rows


def _prompts(rng: random.Random, facts: list[tuple[int, int]], n: int) -> list[dict]:
    combos = [(a, b, q) for a, b in facts for q in QUESTIONS]
    chosen = rng.sample(combos, min(n, len(combos)))
    rows = []
    for a, b, question in chosen:
        prompt = [user(question.format(a=a, b=b))]
        rows.append({"id": stable_id(SOURCE, "prompt", prompt), "source": SOURCE,
                     "prompt": prompt, "a": a, "b": b, "answer": a + b})
    return rows


def build(seed: int = 0, *, max_operand: int = 19, heldout_fraction: float = 0.2,
          n_train: int = 3000, n_test: int = 400, n_sft: int = 4000, n_prompts: int = 200,
          sft_mix: dict[str, float] | None = None) -> dict[str, list[dict]]:
    """All splits in memory: train/test (paired), sft (unpaired, noisy), prompts (held-out)."""
    rng = random.Random(seed)
    facts = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(facts)
    n_heldout = max(1, round(heldout_fraction * len(facts)))
    heldout, seen = sorted(facts[:n_heldout]), sorted(facts[n_heldout:])
    return {
        "train": _pairs(rng, seen, int(n_train)),
        "test": _pairs(rng, heldout, int(n_test)),
        # SFT sees every fact (noisily); only the preference pairs hold facts out.
        "sft": _sft(rng, seen + heldout, int(n_sft), sft_mix or SFT_MIX),
        "prompts": _prompts(rng, heldout, int(n_prompts)),
    }


def generate(out_dir: str | Path, *, seed: int = 0, **options) -> dict[str, int]:
    """Write train/test/sft/prompts .jsonl (and report.json) to `out_dir` atomically; return counts."""
    splits = build(seed=seed, **options)
    counts = {name: len(rows) for name, rows in splits.items()}
    with atomic_dir(out_dir) as tmp:
        for name, rows in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        write_json(tmp / "report.json", {"loader": "synthetic", "seed": seed, "counts": counts,
                                         "options": options})
    return counts


def corpus_texts(splits: dict[str, list[dict]]) -> Iterator[str]:
    """Texts to train a tokenizer on: every message with its role name on a line before it."""
    for rows in splits.values():
        for row in rows:
            for key in ("prompt", "chosen", "rejected", "completion"):
                for message in row.get(key, []):
                    yield f"{message['role']}\n{message['content']}"
