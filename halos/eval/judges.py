"""Pairwise judges: the synthetic task's program, a reward model, or an LLM behind any
OpenAI-compatible `/v1/chat/completions` endpoint.

Every judge answers `compare_many(prompts, a, b)` with one verdict per pair: 1.0 (A better),
0.0 (B better), 0.5 (tie) or None (no usable verdict; left out of the counts), and
`score_many(prompts, texts)` with an absolute score per text (or None when it has none).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from halos.models import VALUE_HEAD_FILE

Messages = list[dict]
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JUDGE_PROMPT = REPO_ROOT / "evals" / "judge" / "pairwise.txt"
ENV_URL, ENV_MODEL, ENV_KEY = "HALOS_JUDGE_URL", "HALOS_JUDGE_MODEL", "HALOS_JUDGE_API_KEY"
ENV_TIMEOUT, ENV_RETRIES = "HALOS_JUDGE_TIMEOUT", "HALOS_JUDGE_RETRIES"


class Judge:
    name = "judge"

    def compare_many(self, prompts: Sequence[Messages], a: Sequence[str],
                     b: Sequence[str]) -> list[float | None]:
        raise NotImplementedError

    def score_many(self, prompts: Sequence[Messages], texts: Sequence[str]) -> list[float] | None:
        return None

    def describe(self) -> dict:
        return {"judge": self.name}


class SyntheticJudge(Judge):
    """The embedded adder task's program judge (1 = states the right sum, else 0)."""

    name = "synthetic"

    def compare_many(self, prompts, a, b):
        from halos.data.synthetic import compare

        return [compare(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]

    def score_many(self, prompts, texts):
        from halos.data.synthetic import judge

        return [judge(p, t) for p, t in zip(prompts, texts, strict=True)]


class RewardModelJudge(Judge):
    """A reward model trained with loss `rm`: the higher-scored reply wins; equal scores
    (within `tie_tolerance`) tie. Prompts are tokenized as the reward model was trained."""

    def __init__(self, model_dir: str | Path, batch_size: int = 16,
                 tie_tolerance: float = 1e-6) -> None:
        from halos.eval import models as minfo

        self.model_dir = minfo.model_folder(model_dir)
        if not (self.model_dir / VALUE_HEAD_FILE).is_file():
            raise FileNotFoundError(f"--judge rm:{model_dir}: no {VALUE_HEAD_FILE}; train a "
                                    f"reward model with `halos align --loss rm`")
        self.info = minfo.training_info(self.model_dir)
        self.batch_size, self.tie_tolerance = batch_size, tie_tolerance
        self.name = f"rm:{model_dir}"
        self._model = self._tokenizer = None

    def _scores(self, prompts, texts) -> list[float]:
        import torch
        from transformers import AutoTokenizer

        from halos.data.tokenize import tokenize_unpaired
        from halos.eval import models as minfo
        from halos.models.value_head import ValueHeadModel, score_texts

        if self._model is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
            self._model = ValueHeadModel.from_pretrained(self.model_dir, dtype=torch.float32)
        config = self.info.get("config", {})
        max_length = int(config.get("max_length") or 512)
        max_prompt = int(config.get("max_prompt_length") or 256)
        template = minfo.chat_template(self.info)

        def encode(prompt, response):
            row = {"id": "judge", "prompt": prompt, "label": "desirable",
                   "completion": [{"role": "assistant", "content": response or " "}]}
            (example,), _ = tokenize_unpaired([row], self._tokenizer, max_length=max_length,
                                             max_prompt_length=max_prompt,
                                             chat_template=template)
            return example.prompt_ids, example.completion_ids

        return score_texts(self.model_dir, list(prompts), list(texts), self._tokenizer,
                           encode=encode, batch_size=self.batch_size, model=self._model,
                           device="cpu" if not torch.cuda.is_available() else None)

    def compare_many(self, prompts, a, b):
        sa, sb = self._scores(prompts, a), self._scores(prompts, b)
        out = []
        for x, y in zip(sa, sb, strict=True):
            out.append(0.5 if abs(x - y) <= self.tie_tolerance else float(x > y))
        return out

    def score_many(self, prompts, texts):
        return self._scores(prompts, texts)


def render_conversation(messages: Messages) -> str:
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


VERDICT = re.compile(r"verdict\s*:\s*\**\s*(response\s*([12])|tie)", re.IGNORECASE)
MENTION = re.compile(r"response\s*([12])", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'1', '2', 'tie' or None: the last `Verdict:` line, else a lone mention of one response."""
    found = VERDICT.findall(text or "")
    if found:
        whole, number = found[-1]
        return number if number else "tie"
    mentioned = set(MENTION.findall(text or ""))
    if len(mentioned) == 1:
        return mentioned.pop()
    if re.search(r"\btie\b", text or "", re.IGNORECASE):
        return "tie"
    return None


class LLMJudge(Judge):
    """An LLM behind an OpenAI-compatible chat endpoint, the Archangel/KTO-paper protocol:
    pairwise "which is more helpful, harmless and concise", the two replies shown in a seeded
    random order (to cancel position bias), temperature 0, bounded retries and timeouts.

    Configuration comes only from the environment: HALOS_JUDGE_URL (base URL such as
    https://api.openai.com/v1, or the full .../chat/completions URL), HALOS_JUDGE_MODEL,
    HALOS_JUDGE_API_KEY (optional for local servers; sent as a Bearer token, never logged or
    written), HALOS_JUDGE_TIMEOUT (seconds, default 60), HALOS_JUDGE_RETRIES (default 3).
    """

    def __init__(self, seed: int = 0, workers: int = 4, prompt_file: str | Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        url, self.model = env.get(ENV_URL, "").strip(), env.get(ENV_MODEL, "").strip()
        if not url or not self.model:
            raise ValueError(f"--judge llm needs the environment variables {ENV_URL} and "
                             f"{ENV_MODEL} (and {ENV_KEY} unless the endpoint is open)")
        self.url = self.endpoint(url)
        self._key = env.get(ENV_KEY, "")
        self.timeout = float(env.get(ENV_TIMEOUT) or 60)
        self.retries = int(env.get(ENV_RETRIES) or 3)
        self.seed, self.workers = seed, max(1, workers)
        path = Path(prompt_file) if prompt_file else DEFAULT_JUDGE_PROMPT
        if not path.is_file():
            raise FileNotFoundError(f"judge prompt template {str(path)!r}: no such file")
        self.template = path.read_text()
        for field in ("{conversation}", "{response_1}", "{response_2}"):
            if field not in self.template:
                raise ValueError(f"judge prompt template {path}: missing the field {field}")
        self.name = f"llm:{self.model}"
        self.failures = 0

    def __repr__(self) -> str:  # never show the key
        return f"LLMJudge(model={self.model!r})"

    @staticmethod
    def endpoint(url: str) -> str:
        url = url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")

    def describe(self) -> dict:
        return {"judge": self.name, "judge_model": self.model, "position": "seeded random",
                "seed": self.seed}

    def prompt(self, conversation: Messages, first: str, second: str) -> str:
        return (self.template.replace("{conversation}", render_conversation(conversation))
                .replace("{response_1}", first).replace("{response_2}", second))

    def _post(self, content: str) -> str | None:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 256,
                           "seed": self.seed,
                           "messages": [{"role": "user", "content": content}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read().decode())
                return reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as err:
                if err.code not in (408, 409, 429) and err.code < 500:
                    raise ValueError(f"LLM judge: the endpoint refused the request (HTTP "
                                     f"{err.code}); check {ENV_URL}, {ENV_MODEL} and "
                                     f"{ENV_KEY}") from None
            except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError,
                    KeyError, IndexError, TypeError):
                pass
            if attempt < self.retries:
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
        self.failures += 1
        return None

    def compare_many(self, prompts, a, b):
        rng = random.Random(self.seed)
        swapped = [rng.random() < 0.5 for _ in prompts]  # True: B is shown as Response 1
        contents = [self.prompt(p, y, x) if s else self.prompt(p, x, y)
                    for p, x, y, s in zip(prompts, a, b, swapped, strict=True)]
        with ThreadPoolExecutor(self.workers) as pool:
            replies = list(pool.map(self._post, contents))
        verdicts: list[float | None] = []
        for reply, swap in zip(replies, swapped, strict=True):
            choice = parse_verdict(reply) if reply is not None else None
            if choice is None:
                verdicts.append(None)
            elif choice == "tie":
                verdicts.append(0.5)
            else:
                a_first = not swap
                verdicts.append(1.0 if (choice == "1") == a_first else 0.0)
        return verdicts


def make_judge(spec: str, *, seed: int = 0, workers: int = 4,
               prompt_file: str | None = None) -> Judge:
    if spec == "synthetic":
        return SyntheticJudge()
    if spec.startswith("rm:"):
        return RewardModelJudge(spec[3:])
    if spec == "llm":
        return LLMJudge(seed=seed, workers=workers, prompt_file=prompt_file)
    raise ValueError(f"--judge {spec!r}: choose synthetic, rm:MODEL_DIR or llm")
