"""`halos eval judge` on constructed sample files: the synthetic judge's exact counts and
statistics, matching against the dataset's chosen replies, and the LLM judge against a local
OpenAI-compatible server (what it received, A/B order, retries, and that the key never leaks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from halos.eval import stats
from halos.eval.cli import main_eval
from halos.eval.judges import LLMJudge, parse_verdict
from halos.files import write_jsonl

SECRET = "sk-test-DO-NOT-LEAK-4b1d9f"


def prompt(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} plus {b}?"}]


def sample_files(tmp: Path, outcomes: list[str]) -> tuple[Path, Path]:
    """One prompt per outcome: 'W' aligned right / baseline wrong, 'L' the reverse,
    'T' both right, 't' both wrong."""
    aligned, baseline = [], []
    for i, outcome in enumerate(outcomes):
        a, b = i % 20, (3 * i) % 20
        right, wrong = f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + 1}."
        mine = right if outcome in "WT" else wrong
        theirs = right if outcome in "LT" else wrong
        common = {"id": f"p{i}", "prompt": prompt(a, b), "temperature": 0.0, "seed": 0,
                  "a": a, "b": b}
        aligned.append({**common, "completion": mine})
        baseline.append({**common, "completion": theirs})
    write_jsonl(tmp / "aligned.jsonl", aligned)
    write_jsonl(tmp / "baseline.jsonl", baseline)
    return tmp / "aligned.jsonl", tmp / "baseline.jsonl"


def test_synthetic_judge_exact_counts_and_statistics(tmp_path: Path) -> None:
    outcomes = ["W"] * 10 + ["L"] * 3 + ["T"] * 3 + ["t"] * 2
    aligned, baseline = sample_files(tmp_path, outcomes)
    out = tmp_path / "judge.json"
    assert main_eval(["judge", "--samples", str(aligned), "--baseline", str(baseline),
                      "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (10, 5, 3, 18)
    assert result["judge"] == "synthetic" and result["invalid"] == 0
    assert result["win_rate"] == pytest.approx(12.5 / 18)
    assert result["ci90"] == pytest.approx([0.50060, 0.83748], abs=1e-5)  # Wilson, ties = 1/2
    assert result["p_value"] == pytest.approx(0.09228515625)  # sign test 10 vs 3
    assert result["ci_method"] == "wilson" and "ties" in result["ci_note"]
    assert result["judge_score"] == pytest.approx(13 / 18)  # W + T correct
    assert result["baseline_score"] == pytest.approx(6 / 18)  # L + T correct
    assert result["temperature"] == 0.0 and result["unmatched"] == 0


def test_all_wins_ci_excludes_half(tmp_path: Path) -> None:
    aligned, baseline = sample_files(tmp_path, ["W"] * 30 + ["T"] * 10)
    out = tmp_path / "judge.json"
    main_eval(["judge", "--samples", str(aligned), "--baseline", str(baseline), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["win_rate"] == pytest.approx(35 / 40)
    assert result["ci90"][0] > 0.5
    assert result["p_value"] == pytest.approx(2 * 0.5 ** 30)


def test_against_chosen_matches_by_prompt(tmp_path: Path) -> None:
    aligned, baseline = sample_files(tmp_path, ["W", "L", "T", "t"])
    rows = [json.loads(line) for line in aligned.read_text().splitlines()]
    # A test.jsonl with other ids: chosen replies are found by prompt; one prompt is absent.
    test = [{"id": f"pair{i}", "prompt": r["prompt"],
             "chosen": [{"role": "assistant", "content": f"The answer is {r['a'] + r['b']}."}],
             "rejected": [{"role": "assistant", "content": "I don't know."}]}
            for i, r in enumerate(rows[:3])]
    write_jsonl(tmp_path / "test.jsonl", test)
    out = tmp_path / "judge.json"
    main_eval(["judge", "--samples", str(aligned), "--baseline", str(baseline), "--out", str(out),
               "--against-chosen", str(tmp_path / "test.jsonl")])
    chosen = json.loads(out.read_text())["against_chosen"]
    # Aligned on the 3 matched prompts: right, wrong, right; chosen always right.
    assert (chosen["n"], chosen["wins"], chosen["ties"], chosen["losses"]) == (3, 0, 2, 1)
    assert chosen["chosen_score"] == 1.0 and chosen["win_rate"] == pytest.approx(1 / 3)


def test_mismatched_files_are_clear_errors(tmp_path: Path) -> None:
    aligned, _ = sample_files(tmp_path, ["W", "L"])
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"id": "zzz", "prompt": prompt(1, 1), "completion": "2"}])
    with pytest.raises(ValueError, match="share no prompt ids"):
        main_eval(["judge", "--samples", str(aligned), "--baseline", str(other),
                   "--out", str(tmp_path / "j.json")])
    with pytest.raises(FileNotFoundError, match="halos sample"):
        main_eval(["judge", "--samples", str(tmp_path / "missing.jsonl"), "--baseline",
                   str(other), "--out", str(tmp_path / "j.json")])
    with pytest.raises(ValueError, match="synthetic, rm:MODEL_DIR or llm"):
        main_eval(["judge", "--samples", str(aligned), "--baseline", str(aligned),
                   "--out", str(tmp_path / "j.json"), "--judge", "gpt"])
    assert not (tmp_path / "j.json").exists()


def test_parse_verdict() -> None:
    assert parse_verdict("blah\nVerdict: Response 2") == "2"
    assert parse_verdict("Response 1 is wordy.\nVerdict: **Response 1**") == "1"
    assert parse_verdict("Verdict: Tie") == "tie"
    assert parse_verdict("I prefer response 2.") == "2"
    assert parse_verdict("Response 1 and Response 2 are both fine") is None
    assert parse_verdict("") is None


# --- the LLM judge against a local OpenAI-compatible server --------------------------------

class JudgeServer:
    """A threaded http.server answering /v1/chat/completions with canned judgments: it prefers
    the reply containing "GOOD", says Tie when both or neither do, answers nonsense for prompts
    containing "GIBBERISH", and fails the first `fail_first` requests with HTTP 500."""

    def __init__(self, fail_first: int = 0, status: int = 200) -> None:
        self.requests: list[dict] = []
        self.fail_first, self.status = fail_first, status
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    failing = server.fail_first > 0
                    server.fail_first -= 1
                if failing or server.status != 200:
                    self.send_response(500 if failing else server.status)
                    self.end_headers()
                    self.wfile.write(b'{"error": "nope"}')
                    return
                reply = server.verdict(body["messages"][-1]["content"])
                payload = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply},
                     "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def verdict(content: str) -> str:
        if "GIBBERISH" in content:
            return "I cannot decide."
        first = content.split("=== RESPONSE 1 ===")[1].split("=== END OF RESPONSE 1 ===")[0]
        second = content.split("=== RESPONSE 2 ===")[1].split("=== END OF RESPONSE 2 ===")[0]
        if ("GOOD" in first) == ("GOOD" in second):
            return "Both are the same.\nVerdict: Tie"
        return "Reasoning...\nVerdict: Response " + ("1" if "GOOD" in first else "2")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def llm_samples(tmp: Path, outcomes: str) -> tuple[Path, Path]:
    """'W': aligned GOOD, baseline bad; 'L' the reverse; 'T' both GOOD; '?' gibberish."""
    aligned, baseline = [], []
    for i, o in enumerate(outcomes):
        p = [{"role": "user", "content": f"Question {i}{' GIBBERISH' if o == '?' else ''}"}]
        aligned.append({"id": f"q{i}", "prompt": p,
                        "completion": f"GOOD reply {i}" if o in "WT" else f"poor reply {i}"})
        baseline.append({"id": f"q{i}", "prompt": p,
                         "completion": f"GOOD base {i}" if o in "LT" else f"poor base {i}"})
    write_jsonl(tmp / "a.jsonl", aligned)
    write_jsonl(tmp / "b.jsonl", baseline)
    return tmp / "a.jsonl", tmp / "b.jsonl"


def run_judge_cli(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    env.pop("HALOS_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "halos", "eval", "judge", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_llm_judge_against_local_server(tmp_path: Path) -> None:
    outcomes = "W" * 14 + "L" * 4 + "T" * 3 + "?"
    aligned, baseline = llm_samples(tmp_path, outcomes)
    out = tmp_path / "judge.json"
    with JudgeServer(fail_first=2) as server:
        env = {"HALOS_JUDGE_URL": server.url, "HALOS_JUDGE_MODEL": "judge-model-x",
               "HALOS_JUDGE_API_KEY": SECRET, "HALOS_JUDGE_RETRIES": "3",
               "HALOS_JUDGE_TIMEOUT": "20"}
        result = run_judge_cli(["--samples", str(aligned), "--baseline", str(baseline),
                                "--out", str(out), "--judge", "llm", "--seed", "3",
                                "--judge-workers", "2"], env)
        assert result.returncode == 0, result.stderr[-3000:]
        requests = list(server.requests)
    judged = json.loads(out.read_text())
    # Two 500s were retried: 22 comparisons, 24 requests, every verdict recovered.
    assert len(requests) == len(outcomes) + 2
    assert (judged["wins"], judged["losses"], judged["ties"], judged["invalid"]) == (14, 4, 3, 1)
    assert judged["n"] == 21 and judged["win_rate"] == pytest.approx(15.5 / 21)
    assert judged["p_value"] == pytest.approx(stats.sign_test_p_value(14, 4))
    assert judged["judge"] == "llm:judge-model-x" and judged["judge_score"] is None
    # What the server received: the chat endpoint, the model, temperature 0, the bearer key,
    # the conversation and both replies in a seeded random order.
    assert {r["path"] for r in requests} == {"/v1/chat/completions"}
    assert all(r["auth"] == f"Bearer {SECRET}" for r in requests)
    bodies = [r["body"] for r in requests]
    assert all(b["model"] == "judge-model-x" and b["temperature"] == 0 for b in bodies)
    contents = {b["messages"][-1]["content"] for b in bodies}
    assert len(contents) == len(outcomes)
    assert all("helpful, harmless and concise" in c for c in contents)
    assert any("Human: Question 0" in c for c in contents)
    aligned_first = sum(c.split("=== RESPONSE 1 ===")[1].lstrip().startswith(("GOOD reply", "poor reply"))
                        for c in contents)
    assert 0 < aligned_first < len(outcomes)  # the order is randomized, both ways occur
    # The key is never written or printed.
    for text in (out.read_text(), result.stdout, result.stderr):
        assert SECRET not in text
    assert "llm:judge-model-x" in result.stdout


def test_llm_judge_order_is_seeded(tmp_path: Path) -> None:
    aligned, baseline = llm_samples(tmp_path, "WLWLWLWLWL")

    def orders(seed: int) -> list[str]:
        with JudgeServer() as server:
            env = {"HALOS_JUDGE_URL": server.url + "/chat/completions",
                   "HALOS_JUDGE_MODEL": "m"}
            judge = LLMJudge(seed=seed, workers=1, env=env)
            from halos.eval.judge import judge_samples

            result = judge_samples(judge, aligned, baseline)
            assert result["wins"] == 5 and result["losses"] == 5
            assert all(r["auth"] is None for r in server.requests)  # no key, no header
            return [r["body"]["messages"][-1]["content"] for r in server.requests]

    assert orders(0) == orders(0)
    assert orders(0) != orders(1)


def test_llm_judge_refused_request_fails_without_leaking_the_key(tmp_path: Path) -> None:
    aligned, baseline = llm_samples(tmp_path, "WL")
    out = tmp_path / "judge.json"
    with JudgeServer(status=401) as server:
        result = run_judge_cli(["--samples", str(aligned), "--baseline", str(baseline),
                                "--out", str(out), "--judge", "llm"],
                               {"HALOS_JUDGE_URL": server.url, "HALOS_JUDGE_MODEL": "m",
                                "HALOS_JUDGE_API_KEY": SECRET})
    assert result.returncode == 2
    assert "HTTP 401" in result.stderr and SECRET not in result.stderr + result.stdout
    assert not out.exists()


def test_llm_judge_needs_its_environment(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HALOS_JUDGE_URL"):
        LLMJudge(env={"HALOS_JUDGE_API_KEY": SECRET})
    judge = LLMJudge(env={"HALOS_JUDGE_URL": "http://127.0.0.1:9", "HALOS_JUDGE_MODEL": "m",
                          "HALOS_JUDGE_API_KEY": SECRET})
    assert SECRET not in repr(judge) and SECRET not in json.dumps(judge.describe())
    assert judge.url == "http://127.0.0.1:9/v1/chat/completions"
