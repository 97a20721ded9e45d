"""Normalized rows -> token ids: chat template, prompt masking, truncation, BOS/EOS exactly once.

A sequence is `prompt_ids + response_ids`. `prompt_ids` is the prompt conversation rendered with the
generation prompt; `response_ids` is the tail of the whole rendered conversation after it, so the
model is trained on exactly the tokens it would emit after the generation prompt, ending in EOS.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from halos.data.errors import DataError, ErrorPolicy, OnError
from halos.data.rows import normalize_row, row_kind
from halos.data.templates import CHAT_TEMPLATES, resolve_chat_template
from halos.data.types import (
    TokenizedCompletion,
    TokenizedExample,
    TokenizedPair,
    token_parts,
)


@dataclass
class TokenizeReport:
    n_in: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    reasons: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items()))
        return (f"tokenized {self.n_in}: kept {self.n_kept}, truncated {self.n_truncated}, "
                f"dropped {self.n_dropped}" + (f" ({detail})" if detail else ""))


class _Encoder:
    """Renders conversations with one template and encodes them with BOS/EOS exactly once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str | None):
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(chat_template) or tokenizer.chat_template
        if self.template is None:
            raise ValueError("the tokenizer has no chat template; pass chat_template= one of "
                             f"{sorted(CHAT_TEMPLATES)} (e.g. 'human_assistant' for base models)")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
        self.eos = tokenizer.eos_token_id
        # Add BOS ourselves only where the tokenizer would (add_special_tokens) and the rendered
        # text lacks it; encoding always runs with add_special_tokens=False.
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos = bos if bos is not None and probe[:1] == [bos] else None

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt,
            chat_template=self.template)

    def with_bos(self, ids: list[int]) -> list[int]:
        """`ids` of a rendered text (encoded without special tokens) with BOS exactly once."""
        if self.bos is not None and ids[:1] != [self.bos]:
            ids = [self.bos, *ids]
        if self.bos is not None and ids[:2] == [self.bos, self.bos]:
            raise DataError("the chat template renders BOS twice", reason="double_bos")
        return ids

    def encode_all(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts in one call (the fast tokenizer's batched Rust path)."""
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def render_row(self, row: dict, fields: tuple[str, ...]) -> list[str]:
        """[prompt text, then the whole conversation's text for each response field]."""
        prompt_text = self.render(row["prompt"], generation_prompt=True)
        full_texts = [self.render(row["prompt"] + row[name], generation_prompt=False)
                      for name in fields]
        if not all(text.startswith(prompt_text) for text in full_texts):
            raise DataError("the chat template renders the prompt differently inside the whole "
                            "conversation, so the response cannot be cut out of it",
                            reason="template_mismatch")
        return [prompt_text, *full_texts]

    def cut(self, texts: list[str], encoded: list[list[int]],
            reasons: Counter) -> tuple[list[int], list[list[int]]]:
        """Prompt ids and each response's ids (ending in EOS) from `render_row`'s texts and
        their encodings."""
        prompt_ids = self.with_bos(encoded[0])
        return prompt_ids, [self._response(texts[0], prompt_ids, text, self.with_bos(ids), reasons)
                            for text, ids in zip(texts[1:], encoded[1:], strict=True)]

    def _response(self, prompt_text: str, prompt_ids: list[int], full_text: str,
                  full_ids: list[int], reasons: Counter) -> list[int]:
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids[len(prompt_ids):]
        else:  # a BPE merge across the seam: encode the response text on its own
            reasons["seam_retokenized"] += 1
            ids = self.encode_all([full_text[len(prompt_text):]])[0]
        if self.eos in ids:  # drop what a template writes after the final EOS (e.g. "\n")
            return ids[: len(ids) - ids[::-1].index(self.eos)]
        return [*ids, self.eos]


def _truncate(prompt: list[int], responses: list[list[int]], max_length: int,
              max_prompt_length: int | None, keep_first: bool, reasons: Counter
              ) -> tuple[list[int], list[list[int]], bool]:
    """Left-truncate the prompt to `max_prompt_length` (keeping BOS), then right-truncate the
    responses to what is left of `max_length`."""
    if len(prompt) + max(map(len, responses)) <= max_length:
        return prompt, responses, False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        head = prompt[:1] if keep_first else []
        prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)):]
        reasons["truncated_prompt"] += 1
    budget = max_length - len(prompt)
    if budget < 1:
        raise DataError(f"prompt is {len(prompt)} tokens, leaving no room for a response within "
                        f"max_length={max_length}", reason="prompt_too_long",
                        hint="raise max_length, lower max_prompt_length, or skip such examples")
    if max(map(len, responses)) > budget:
        reasons["truncated_response"] += 1
    return prompt, [r[:budget] for r in responses], True


def _where(rows: Sequence[dict], index: int) -> tuple[str, int]:
    lines = getattr(rows, "lines", None)
    path = getattr(rows, "path", None)
    if path and lines:
        return path, lines[index]
    return f"<rows> (id {rows[index].get('id')!r})", index + 1


_ENCODE_BATCH = 512  # rows rendered, then encoded in one tokenizer call


def _tokenize(rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase, kind: str,
              max_length: int, max_prompt_length: int | None, chat_template: str | None,
              on_error: OnError | ErrorPolicy) -> tuple[list, TokenizeReport]:
    encoder = _Encoder(tokenizer, chat_template)
    policy = ErrorPolicy.of(on_error)
    report = TokenizeReport(n_in=len(rows))
    fields = ("chosen", "rejected") if kind == "paired" else ("completion",)
    out = []
    for start in range(0, len(rows), _ENCODE_BATCH):
        indices = range(start, min(start + _ENCODE_BATCH, len(rows)))
        rendered = {i: r for i in indices
                    if (r := _guarded(rows, i, report, policy, _render, rows[i], encoder, kind,
                                      fields))}
        flat = encoder.encode_all([text for _, texts in rendered.values() for text in texts])
        at = 0
        for i, (row, texts) in rendered.items():
            encoded, at = flat[at : at + len(texts)], at + len(texts)
            example = _guarded(rows, i, report, policy, _example, encoder, row, texts, encoded,
                               kind, max_length, max_prompt_length, report)
            if example is not None:
                out.append(example)
    report.n_kept = len(out)
    return out, report


def _guarded(rows: Sequence[dict], index: int, report: TokenizeReport, policy: ErrorPolicy,
             step, *args):
    """`step(*args)` for row `index`, or None after counting (and by policy raising) a DataError
    that names the row's file and line."""
    try:
        return step(*args)
    except DataError as err:
        report.n_dropped += 1
        report.reasons[err.reason] += 1
        policy.handle(err.at(*_where(rows, index)))
        return None


def _render(raw: dict, encoder: _Encoder, kind: str,
            fields: tuple[str, ...]) -> tuple[dict, list[str]]:
    row = normalize_row(raw)
    if row_kind(row) != kind:
        raise DataError(f"expected a {kind} row, got a {row_kind(row)} one", reason="wrong_shape")
    return row, encoder.render_row(row, fields)


def _example(encoder: _Encoder, row: dict, texts: list[str],
             encoded: list[list[int]], kind: str, max_length: int,
             max_prompt_length: int | None, report: TokenizeReport) -> TokenizedExample:
    prompt, responses = encoder.cut(texts, encoded, report.reasons)
    prompt, responses, cut = _truncate(prompt, responses, max_length, max_prompt_length,
                                       encoder.bos is not None, report.reasons)
    report.n_truncated += cut
    if kind == "paired":
        return TokenizedPair(row["id"], prompt, responses[0], responses[1])
    return TokenizedCompletion(row["id"], prompt, responses[0],
                               desirable=row["label"] == "desirable")


def tokenize_paired(rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                    max_prompt_length: int | None, chat_template: str | None = None,
                    on_error: OnError | ErrorPolicy = "raise"
                    ) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Paired rows -> TokenizedPair (one prompt shared by chosen and rejected)."""
    return _tokenize(rows, tokenizer, "paired", max_length, max_prompt_length, chat_template,
                     on_error)


def tokenize_unpaired(rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase, *,
                      max_length: int, max_prompt_length: int | None,
                      chat_template: str | None = None, on_error: OnError | ErrorPolicy = "raise"
                      ) -> tuple[list[TokenizedCompletion], TokenizeReport]:
    """Unpaired rows -> TokenizedCompletion (`desirable` from the label)."""
    return _tokenize(rows, tokenizer, "unpaired", max_length, max_prompt_length, chat_template,
                     on_error)


def data_fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """sha256 over every example's token ids, in order (keys precomputed reference log-probs)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(b"P" if isinstance(example, TokenizedPair) else b"C")
        for ids in token_parts(example):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(array("q", ids).tobytes())
    return digest.hexdigest()
