"""`halos eval judge`: win-rate of one model's samples against a baseline's (and the dataset's
chosen replies), with a 90% interval and a sign-test p-value (conventions in `stats`)."""

from __future__ import annotations

import json
from pathlib import Path

from halos.eval import stats
from halos.eval.judges import Judge
from halos.files import numbered_json_lines


def read_samples(path: str | Path, what: str) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such file (make it with `halos sample`)")
    rows: dict[str, dict] = {}
    for number, row in numbered_json_lines(path):
        if not isinstance(row, dict) or not {"id", "prompt", "completion"} <= set(row):
            raise ValueError(f"{path}:{number}: a sample row needs id, prompt and completion")
        if row["id"] in rows:
            raise ValueError(f"{path}:{number}: duplicate id {row['id']!r}")
        rows[row["id"]] = row
    if not rows:
        raise ValueError(f"{what} {str(path)!r}: no samples")
    return rows


def _prompt_key(prompt) -> str:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return json.dumps([[m.get("role"), m.get("content")] for m in prompt], ensure_ascii=False)


def _reply_text(value) -> str | None:
    """The text of a reply: a string, or the last assistant message of a message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for message in reversed(value):
            if isinstance(message, dict) and message.get("role") == "assistant":
                return message.get("content")
    return None


def read_chosen(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Chosen replies of a dataset file (test.jsonl pairs, or rows with a `chosen` field), keyed
    by row id and by prompt (the first row of each prompt wins)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--against-chosen {str(path)!r}: no such file")
    by_id: dict[str, str] = {}
    by_prompt: dict[str, str] = {}
    for _, row in numbered_json_lines(path):
        text = _reply_text(row.get("chosen"))
        if text is None and row.get("label") == "desirable":
            text = _reply_text(row.get("completion"))
        if text is None or "prompt" not in row:
            continue
        if "id" in row:
            by_id.setdefault(str(row["id"]), text)
        by_prompt.setdefault(_prompt_key(row["prompt"]), text)
    if not by_prompt:
        raise ValueError(f"--against-chosen {str(path)!r}: no rows with a prompt and a chosen "
                         f"(or desirable) reply")
    return by_id, by_prompt


def _counts(verdicts: list[float | None]) -> dict:
    wins = sum(v == 1.0 for v in verdicts)
    losses = sum(v == 0.0 for v in verdicts)
    ties = sum(v == 0.5 for v in verdicts)
    invalid = sum(v is None for v in verdicts)
    return {**stats.win_summary(wins, ties, losses), "invalid": invalid}


def _mean(values: list[float] | None) -> float | None:
    return float(sum(values) / len(values)) if values else None


def judge_samples(judge: Judge, samples: str | Path, baseline: str | Path,
                  against_chosen: str | Path | None = None) -> dict:
    aligned = read_samples(samples, "--samples")
    base = read_samples(baseline, "--baseline")
    ids = [i for i in aligned if i in base]
    if not ids:
        raise ValueError(f"--samples {str(samples)!r} and --baseline {str(baseline)!r} share no "
                         f"prompt ids; sample both from the same prompts file")
    for i in ids:
        if _prompt_key(aligned[i]["prompt"]) != _prompt_key(base[i]["prompt"]):
            raise ValueError(f"id {i!r} has different prompts in --samples and --baseline")
    prompts = [aligned[i]["prompt"] for i in ids]
    ours = [aligned[i]["completion"] for i in ids]
    theirs = [base[i]["completion"] for i in ids]
    verdicts = judge.compare_many(prompts, ours, theirs)
    first = aligned[ids[0]]
    result = {
        **judge.describe(), **_counts(verdicts),
        "ci_method": stats.CI_METHOD, "ci_note": stats.CI_NOTE,
        "p_value_method": stats.P_VALUE_NOTE,
        "judge_score": _mean(judge.score_many(prompts, ours)),
        "baseline_score": _mean(judge.score_many(prompts, theirs)),
        "samples": str(samples), "baseline": str(baseline),
        "unmatched": len(aligned) + len(base) - 2 * len(ids),
        "temperature": first.get("temperature"), "seed": first.get("seed"),
    }
    if against_chosen:
        by_id, by_prompt = read_chosen(against_chosen)
        matched = []
        for i in ids:
            text = _reply_text(aligned[i].get("chosen")) or by_id.get(i) \
                or by_prompt.get(_prompt_key(aligned[i]["prompt"]))
            if text is not None:
                matched.append((i, text))
        if not matched:
            raise ValueError(f"--against-chosen {str(against_chosen)!r}: none of the sampled "
                             f"prompts has a chosen reply there (matched by id, then by prompt)")
        cp = [aligned[i]["prompt"] for i, _ in matched]
        chosen = [t for _, t in matched]
        mine = [aligned[i]["completion"] for i, _ in matched]
        result["against_chosen"] = {
            **_counts(judge.compare_many(cp, mine, chosen)),
            "judge_score": _mean(judge.score_many(cp, mine)),
            "chosen_score": _mean(judge.score_many(cp, chosen)),
            "source": str(against_chosen),
        }
    failures = getattr(judge, "failures", 0)
    if failures:
        result["request_failures"] = failures
    return result
