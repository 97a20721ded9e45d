"""The two normalized row shapes: building them, stable ids, and validation."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from halos.data.errors import DataError

RowKind = Literal["paired", "unpaired"]
ROLES = ("system", "user", "assistant")
LABELS = ("desirable", "undesirable")
PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")


def stable_id(source: str, *parts: object) -> str:
    """A content hash: re-preparing the same data gives the same ids, whatever the row order."""
    blob = json.dumps([source, *parts], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def paired_row(source: str, prompt: list[dict], chosen: list[dict], rejected: list[dict],
               id: str | None = None) -> dict:
    return {"id": id or stable_id(source, prompt, chosen, rejected), "source": source,
            "prompt": prompt, "chosen": chosen, "rejected": rejected}


def unpaired_row(source: str, prompt: list[dict], completion: list[dict], label: str,
                 id: str | None = None) -> dict:
    return {"id": id or stable_id(source, prompt, completion, label), "source": source,
            "prompt": prompt, "completion": completion, "label": label}


def as_messages(value: object, role: str, field: str) -> list[dict]:
    """A message list; a bare string is shorthand for one message of `role`."""
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"field {field!r} must be a non-empty list of messages or a string",
                        reason="bad_messages")
    out = []
    for message in value:
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise DataError(f"field {field!r} has a malformed message {message!r}; expected "
                            f"{{'role': one of {ROLES}, 'content': str}}", reason="bad_messages")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def row_kind(row: dict) -> RowKind:
    if "chosen" in row or "rejected" in row:
        return "paired"
    if "completion" in row or "label" in row:
        return "unpaired"
    raise DataError("row is neither paired (prompt/chosen/rejected) nor unpaired "
                    "(prompt/completion/label)", reason="missing_field")


def _require(row: dict, fields: tuple[str, ...]) -> None:
    for name in fields:
        if name not in row or row[name] is None:
            raise DataError(f"missing field {name!r}", reason="missing_field")


def _check_response(messages: list[dict], field: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise DataError(f"field {field!r} must end with an assistant message", reason="bad_messages")
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise DataError(f"empty completion in field {field!r}", reason="empty_completion")


def normalize_row(row: dict, default_source: str = "local") -> dict:
    """Validate `row` (either shape, string shorthand allowed) and return it normalized.

    Raises DataError (without a location; the caller adds file and line).
    """
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", reason="not_an_object")
    kind = row_kind(row)
    source = str(row.get("source") or default_source)
    if kind == "paired":
        _require(row, PAIRED_FIELDS)
        prompt = as_messages(row["prompt"], "user", "prompt")
        chosen = as_messages(row["chosen"], "assistant", "chosen")
        rejected = as_messages(row["rejected"], "assistant", "rejected")
        _check_response(chosen, "chosen")
        _check_response(rejected, "rejected")
        if chosen == rejected:
            raise DataError("chosen is identical to rejected", reason="identical_pair")
        return paired_row(source, prompt, chosen, rejected, id=_given_id(row))
    _require(row, UNPAIRED_FIELDS)
    prompt = as_messages(row["prompt"], "user", "prompt")
    completion = as_messages(row["completion"], "assistant", "completion")
    _check_response(completion, "completion")
    label = row["label"]
    if isinstance(label, bool):
        label = LABELS[0] if label else LABELS[1]
    if label not in LABELS:
        raise DataError(f"label must be one of {LABELS} (or a boolean), got {label!r}",
                        reason="bad_label")
    return unpaired_row(source, prompt, completion, label, id=_given_id(row))


def _given_id(row: dict) -> str | None:
    value = row.get("id")
    return None if value is None or value == "" else str(value)
