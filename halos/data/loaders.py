"""One loader per source, each turning upstream records into normalized rows.

A loader is `loader(source, split, **options) -> Iterator[dict]`: `source` is a Hub id (read with
`datasets.load_dataset`) or a local file/folder holding the same upstream files. Adding a dataset
is a row in configs/datasets.yaml plus, if its format is new, one function here.
"""

from __future__ import annotations

import inspect
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from halos.data.errors import DataError, ErrorPolicy, OnError
from halos.data.readers import Record, records
from halos.data.rows import as_messages, assistant, normalize_row, paired_row, row_kind, user
from halos.data.synthetic import build as build_synthetic

Loader = Callable[..., Iterator[dict]]
LOADERS: dict[str, Loader] = {}
DEFAULT_SPLITS: dict[str, dict[str, str]] = {}
# Where a loader's `**options` go, if it takes them (their names are that function's parameters).
OPTIONS_OF: dict[str, Callable] = {}
# Parameters of a loader that are not its options: given by prepare_dataset's own arguments.
NOT_OPTIONS = ("source", "split", "on_error", "seed")


def register_loader(name: str, splits: dict[str, str] | None = None,
                    options_of: Callable | None = None) -> Callable[[Loader], Loader]:
    """Register a loader under `name`; `splits` maps output split names to upstream ones;
    `options_of` is the function its `**options` are passed to, if any."""
    def decorate(fn: Loader) -> Loader:
        LOADERS[name] = fn
        DEFAULT_SPLITS[name] = splits or {"train": "train", "test": "test"}
        OPTIONS_OF[name] = options_of or fn
        return fn
    return decorate


def get_loader(name: str) -> Loader:
    if name not in LOADERS:
        raise KeyError(f"unknown loader {name!r}; choose from {sorted(LOADERS)}")
    return LOADERS[name]


def loader_options(name: str) -> dict[str, inspect.Parameter]:
    """The options loader `name` takes (its keyword parameters but source, split, on_error and
    seed), by name."""
    get_loader(name)
    params = inspect.signature(OPTIONS_OF[name]).parameters.values()
    return {p.name: p for p in sorted(params, key=lambda p: p.name)
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in NOT_OPTIONS}


def checked_loader_options(name: str, options: dict) -> dict:
    """`options` of loader `name`, checked before any work: an unknown option is a DataError
    naming it and the valid ones; where the default is a number the value must be one (text
    from `--option n_train=200` is converted)."""
    known = loader_options(name)
    checked = {}
    for key, value in options.items():
        if key not in known:
            raise DataError(f"loader {name!r} has no option {key!r}; valid options: "
                            f"{', '.join(known) or 'none'}", reason="bad_option")
        checked[key] = _option_value(name, key, value, known[key].default)
    return checked


def _option_value(loader: str, key: str, value: object, default: object) -> object:
    """A numeric option's value as a number (text converted); other options pass as given."""
    kind = type(default)
    if kind not in (int, float):
        return value
    numbers = (int, float) if kind is float else (int,)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    elif isinstance(value, numbers) and not isinstance(value, bool):
        return value
    words = "an integer" if kind is int else "a number"
    raise DataError(f"loader {loader!r} option {key} must be {words}, got {value!r}",
                    reason="bad_option")


def _field(data: dict, name: str) -> object:
    if name not in data or data[name] is None:
        raise DataError(f"missing field {name!r}", reason="missing_field")
    return data[name]


def _text(data: dict, name: str) -> str:
    value = _field(data, name)
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be a string, got {type(value).__name__}",
                        reason="bad_field")
    return value


def _names(value: str | Iterable[str] | None) -> list[str] | None:
    """Option values given as a list or a comma-separated string (as from --option k=a,b)."""
    if value is None:
        return None
    return [v for v in value.split(",") if v] if isinstance(value, str) else list(value)


def _converted(recs: Iterable[Record], to_rows: Callable[[Record], Iterable[dict]],
               policy: ErrorPolicy) -> Iterator[dict]:
    """Normalize and validate what `to_rows` makes of each record; errors get its file and line."""
    for rec in recs:
        try:
            yield from [normalize_row(row) for row in to_rows(rec)]
        except DataError as err:
            policy.handle(err.at(rec.file, rec.line))


# --- Anthropic HH -------------------------------------------------------------------------------

HH_SUBSETS = {
    "helpful": ("helpful-base", "helpful-online", "helpful-rejection-sampled"),
    "harmless": ("harmless-base",),
}
HH_SUBSETS["all"] = HH_SUBSETS["helpful"] + HH_SUBSETS["harmless"]
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_PROMPT_END = "\n\nAssistant:"


def hh_turns(transcript: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b] (a trailing empty turn dropped)."""
    if not transcript.startswith("\n\nHuman:"):
        raise DataError("transcript does not start with '\\n\\nHuman:'", reason="bad_transcript")
    parts = HH_TURN.split(transcript)
    messages = [{"role": HH_ROLES[who], "content": body.strip()}
                for who, body in zip(parts[1::2], parts[2::2], strict=True)]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def hh_split(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Split two full HH transcripts into the shared prompt conversation and the two replies."""
    # Cut at the last "Assistant:" the two transcripts share, not the last one in `chosen`,
    # whose reply may itself contain the marker.
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_PROMPT_END)
    if cut < 0:
        raise DataError("chosen and rejected share no prompt ending in '\\n\\nAssistant:'",
                        reason="bad_transcript")
    cut += len(HH_PROMPT_END)
    return hh_turns(chosen[:cut]), chosen[cut:].strip(), rejected[cut:].strip()


@register_loader("hh")
def hh(source: str = "Anthropic/hh-rlhf", split: str = "train", *,
       subsets: str | Iterable[str] = "all", on_error: OnError | ErrorPolicy = "raise"
       ) -> Iterator[dict]:
    """Anthropic HH-RLHF; `subsets`: 'helpful', 'harmless', 'all' or folder names."""
    policy = ErrorPolicy.of(on_error)
    names = HH_SUBSETS.get(subsets, subsets) if isinstance(subsets, str) else subsets
    names = _names(names)

    def to_rows(rec: Record) -> Iterator[dict]:
        prompt, chosen, rejected = hh_split(_text(rec.data, "chosen"), _text(rec.data, "rejected"))
        name = f"hh/{rec.group}" if rec.group else "hh"
        yield paired_row(name, prompt, [assistant(chosen)], [assistant(rejected)])

    subdirs = names if Path(source).is_dir() or not Path(source).exists() else None
    return _converted(records(source, split, policy, subdirs), to_rows, policy)


# --- Stanford Human Preferences -----------------------------------------------------------------

def _shp_domain(rec: Record) -> str:
    domain = rec.group or str(rec.data.get("domain") or "")
    return re.sub(r"_(train|validation|test)$", "", domain)


@register_loader("shp")
def shp(source: str = "stanfordnlp/SHP", split: str = "train", *,
        domains: str | Iterable[str] | None = None, min_score_ratio: float = 2.0,
        max_pairs_per_post: int = 5, on_error: OnError | ErrorPolicy = "raise") -> Iterator[dict]:
    """SHP pairs with score ratio >= `min_score_ratio`, at most `max_pairs_per_post` per post
    (the most confident ones), as in Archangel."""
    policy = ErrorPolicy.of(on_error)
    min_score_ratio, max_pairs_per_post = float(min_score_ratio), int(max_pairs_per_post)
    by_post: dict[str, list[tuple[float, dict]]] = defaultdict(list)

    def to_rows(rec: Record) -> Iterator[dict]:
        ratio = float(_field(rec.data, "score_ratio"))
        refs = _text(rec.data, "human_ref_A"), _text(rec.data, "human_ref_B")
        a_wins = int(_field(rec.data, "labels")) == 1
        row = normalize_row(paired_row(
            f"shp/{_shp_domain(rec)}", [user(_text(rec.data, "history"))],
            [assistant(refs[0 if a_wins else 1])], [assistant(refs[1 if a_wins else 0])]))
        if ratio < min_score_ratio:
            policy.note(f"score_ratio<{min_score_ratio:g}")
            return
        by_post[str(_field(rec.data, "post_id"))].append((ratio, row))
        yield row

    for _ in _converted(records(source, split, policy, _names(domains)), to_rows, policy):
        pass
    for pairs in by_post.values():
        ranked = sorted(pairs, key=lambda pair: -pair[0])  # stable: file order among equal ratios
        if len(ranked) > max_pairs_per_post:
            policy.note(f"over_{max_pairs_per_post}_pairs_per_post", len(ranked) - max_pairs_per_post)
        yield from (row for _, row in ranked[:max_pairs_per_post])


# --- OpenAssistant OASST1 -----------------------------------------------------------------------

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _oasst_message(rec: Record) -> dict:
    data = rec.data
    role = _text(data, "role")
    if role not in OASST_ROLES:
        raise DataError(f"role must be 'prompter' or 'assistant', got {role!r}", reason="bad_field")
    return {"id": _text(data, "message_id"), "parent": data.get("parent_id"),
            "role": OASST_ROLES[role], "text": _text(data, "text"), "lang": data.get("lang"),
            "rank": data.get("rank"), "deleted": bool(data.get("deleted")), "rec": rec}


def _oasst_history(message: dict, by_id: dict[str, dict]) -> list[dict]:
    path = []
    while message is not None:
        path.append({"role": message["role"], "content": message["text"]})
        parent = message["parent"]
        if parent is not None and parent not in by_id:
            raise DataError(f"parent message {parent!r} is not in this split", reason="orphan")
        message = by_id.get(parent) if parent is not None else None
    return path[::-1]


@register_loader("oasst1", splits={"train": "train", "test": "validation"})
def oasst1(source: str = "OpenAssistant/oasst1", split: str = "train", *,
           langs: str | Iterable[str] | None = "en", on_error: OnError | ErrorPolicy = "raise"
           ) -> Iterator[dict]:
    """OASST1 trees: for each prompter message, its best-ranked reply against each other ranked
    reply; the prompt is the whole conversation down to that message. `langs=None` keeps all."""
    policy = ErrorPolicy.of(on_error)
    wanted = set(_names(langs)) if langs is not None else None
    by_id: dict[str, dict] = {}
    for rec in records(source, split, policy):
        try:
            message = _oasst_message(rec)
        except DataError as err:
            policy.handle(err.at(rec.file, rec.line))
            continue
        by_id[message["id"]] = message
    replies: dict[str, list[dict]] = defaultdict(list)
    for message in by_id.values():
        if message["role"] == "assistant" and message["rank"] is not None and not message["deleted"]:
            replies[message["parent"]].append(message)
    for parent_id, ranked in replies.items():
        parent = by_id.get(parent_id)
        if parent is None or len(ranked) < 2:
            continue
        if parent["deleted"] or (wanted is not None and parent["lang"] not in wanted):
            policy.note("language" if not parent["deleted"] else "deleted_prompt")
            continue
        pairs = _oasst_pairs(parent, ranked, by_id)
        yield from _converted([parent["rec"]], lambda _, pairs=pairs: pairs, policy)


def _oasst_pairs(parent: dict, ranked: list[dict], by_id: dict[str, dict]) -> Iterator[dict]:
    prompt = _oasst_history(parent, by_id)
    best, *others = sorted(ranked, key=lambda m: m["rank"])
    for other in others:
        yield paired_row("oasst1", prompt, [assistant(best["text"])], [assistant(other["text"])])


# --- UltraFeedback binarized --------------------------------------------------------------------

@register_loader("ultrafeedback", splits={"train": "train_prefs", "test": "test_prefs"})
def ultrafeedback(source: str = "HuggingFaceH4/ultrafeedback_binarized",
                  split: str = "train_prefs", *, on_error: OnError | ErrorPolicy = "raise"
                  ) -> Iterator[dict]:
    """UltraFeedback binarized: `chosen`/`rejected` are whole conversations sharing the prompt."""
    policy = ErrorPolicy.of(on_error)

    def to_rows(rec: Record) -> Iterator[dict]:
        chosen = as_messages(_field(rec.data, "chosen"), "assistant", "chosen")
        rejected = as_messages(_field(rec.data, "rejected"), "assistant", "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise DataError("chosen and rejected differ before their last message",
                            reason="bad_transcript")
        prompt = chosen[:-1] or [user(_text(rec.data, "prompt"))]
        yield paired_row("ultrafeedback", prompt, chosen[-1:], rejected[-1:])

    return _converted(records(source, split, policy), to_rows, policy)


# --- users' own files in a normalized shape -----------------------------------------------------

def normalized_rows(recs: Iterable[Record], policy: ErrorPolicy, default_source: str
                    ) -> Iterator[tuple[Record, dict]]:
    """Validate records already in a normalized shape; one file must not mix the two shapes."""
    kinds: dict[str, str] = {}
    for rec in recs:
        try:
            row = normalize_row(rec.data, default_source)
            first = kinds.setdefault(rec.file, row_kind(row))
            if row_kind(row) != first:
                raise DataError(f"a {row_kind(row)} row in a file of {first} rows",
                                reason="mixed_shapes")
        except DataError as err:
            policy.handle(err.at(rec.file, rec.line))
            continue
        yield rec, row


@register_loader("local")
def local(source: str, split: str = "train", *, name: str | None = None,
          on_error: OnError | ErrorPolicy = "raise") -> Iterator[dict]:
    """A JSONL/JSON/Parquet file (or a folder with `<split>.*` files) in either normalized shape;
    a string prompt/chosen/rejected/completion is shorthand for one message."""
    policy = ErrorPolicy.of(on_error)
    if not Path(source).exists():
        raise DataError(f"no such file or folder: {source}", reason="missing_file")
    default_source = name or Path(source).name.split(".")[0]
    for _, row in normalized_rows(records(source, split, policy), policy, default_source):
        yield row


# --- the embedded synthetic task ----------------------------------------------------------------

@register_loader("synthetic", splits={"train": "train", "test": "test"}, options_of=build_synthetic)
def synthetic(source: str = "synthetic", split: str = "train", *, seed: int = 0,
              on_error: OnError | ErrorPolicy = "raise", **options) -> Iterator[dict]:
    """Rows of the seeded "helpful adder" task (`source` is ignored); see halos.data.synthetic."""
    splits = build_synthetic(seed=int(seed), **options)
    if split not in splits:
        raise KeyError(f"unknown synthetic split {split!r}; choose from {sorted(splits)}")
    yield from splits[split]
