"""Publish one trained model folder to the Hugging Face Hub, safely and idempotently.

    plan (files + card) -> dry run: write the folder, list the operations; or
    create_repo(exist_ok) -> [create_branch] -> diff against the remote revision (git blob sha1
    for regular files, sha256 for LFS files) -> nothing to do | refuse | one create_commit
    -> [collection] -> reload from the revision just written and generate -> record (published.json)

A repo (or branch) that already holds other content is never overwritten unless `overwrite` is
set or a new branch is named. The token comes from `huggingface_hub.get_token()` (HF_TOKEN or
`hf auth login`) and is handed only to the client: it is never printed, logged or written.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from halos.files import write_json
from halos.hub.card import CardInputs, RunId, build_card, has_chat_template, read_evals
from halos.hub.plan import ADAPTER_CONFIG, CARD, Plan, PublishError, build_plan, write_plan
from halos.models import VALUE_HEAD_FILE

IGNORED_REMOTE = (".gitattributes",)  # created by the Hub with every repo
Log = Callable[[str], None]


@dataclass
class PublishOptions:
    folder: Path
    repo_id: str
    run: RunId
    eval_dir: Path | None = None
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    private: bool = True
    revision: str = "main"
    overwrite: bool = False
    collection: str | None = None
    reload_check: bool = True
    record: Path | None = None
    dry_run: Path | None = None
    commit_message: str | None = None
    endpoint: str | None = None  # default: HF_ENDPOINT (which the reload check's transformers uses)


@dataclass
class Diff:
    head: str | None
    added: list[str]
    changed: list[str]
    unchanged: list[str]
    extra: list[str]

    @property
    def clean(self) -> bool:
        return not (self.added or self.changed or self.extra)

    @property
    def remote_empty(self) -> bool:
        return not (self.changed or self.unchanged or self.extra)


# --------------------------------------------------------------------------------- the card, plan

def card_inputs(opts: PublishOptions) -> CardInputs:
    from halos.eval import models as minfo

    info = minfo.training_info(opts.folder)
    eval_dir = opts.eval_dir or opts.folder.parent / "eval"
    return CardInputs(repo_id=opts.repo_id, run=opts.run, training=info,
                      evals=read_evals(eval_dir) if eval_dir.is_dir() else {},
                      base_model=opts.base_model, datasets=list(opts.datasets),
                      license=opts.license,
                      has_value_head=(opts.folder / VALUE_HEAD_FILE).is_file(),
                      is_adapter=(opts.folder / ADAPTER_CONFIG).is_file(),
                      prompt_suffix=minfo.prompt_suffix(info) if info else "",
                      has_chat_template=has_chat_template(opts.folder))


def prepare(opts: PublishOptions) -> Plan:
    if not opts.folder.is_dir():
        raise PublishError(f"{opts.folder}: no such model folder")
    return build_plan(opts.folder, str(build_card(card_inputs(opts))), opts.base_model)


def operations(plan: Plan, diff: Diff | None, opts: PublishOptions) -> list[dict]:
    """The operations a publish makes, as data (the dry run lists them; the record keeps them)."""
    ops: list[dict] = [{"op": "create_repo", "repo_id": opts.repo_id, "private": opts.private,
                        "exist_ok": True}]
    if opts.revision != "main":
        ops.append({"op": "create_branch", "branch": opts.revision, "exist_ok": True})
    paths = sorted(plan) if diff is None else sorted(diff.added + diff.changed)
    files = [{"path": p, "size": plan[p].size, "sha256": plan[p].sha256,
              "upload": "lfs" if plan[p].likely_lfs else "regular"} for p in paths]
    deletes = [] if diff is None else sorted(diff.extra)
    if files or deletes:
        ops.append({"op": "create_commit", "revision": opts.revision, "add": files,
                    "delete": deletes})
    if opts.collection:
        ops.append({"op": "add_collection_item", "collection": opts.collection,
                    "item": opts.repo_id})
    if opts.reload_check:
        ops.append({"op": "reload_check", "repo_id": opts.repo_id})
    return ops


def dry_run(opts: PublishOptions, plan: Plan, log: Log) -> dict:
    """Write the exact folder that would be uploaded (`DIR/upload/`) and the operations
    (`DIR/operations.json`); no request is made."""
    assert opts.dry_run is not None
    write_plan(plan, opts.dry_run / "upload")
    ops = operations(plan, None, opts)
    write_json(opts.dry_run / "operations.json", {"repo_id": opts.repo_id, "operations": ops})
    for op in ops:
        detail = {k: v for k, v in op.items() if k not in ("op", "add")}
        log(f"[dry-run] {op['op']} {json.dumps(detail, sort_keys=True)}")
        for item in op.get("add", []):
            log(f"[dry-run]   add {item['path']} ({item['size']} bytes, {item['upload']})")
    log(f"[dry-run] folder that would be uploaded: {opts.dry_run / 'upload'}")
    result = {"repo_id": opts.repo_id, "status": "dry-run", "dry_run": str(opts.dry_run),
              "operations": ops}
    if opts.record is not None:
        write_json(opts.record, result)
    return result


# ---------------------------------------------------------------------------------- the remote

def hub_api(endpoint: str | None = None):
    """An HfApi holding the user's token; refuses when none is configured or the Hub is offline."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE=1 blocks every Hub request; unset it to publish "
                           "(or use --dry-run)")
    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` "
                           "(a token with write access to the target namespace)")
    return HfApi(endpoint=endpoint, token=token)


def ensure_revision(api, opts: PublishOptions) -> bool:
    """create_repo(exist_ok=True), and the branch if one is named; True if the branch is new."""
    from huggingface_hub.errors import RevisionNotFoundError

    api.create_repo(opts.repo_id, private=opts.private, exist_ok=True)
    if opts.revision == "main":
        return False
    try:
        api.repo_info(opts.repo_id, revision=opts.revision)
        return False
    except RevisionNotFoundError:
        api.create_branch(opts.repo_id, branch=opts.revision, exist_ok=True)
        return True


def remote_diff(api, opts: PublishOptions, plan: Plan) -> Diff:
    """Compare the plan with the files of the revision: LFS files by sha256, others by git sha1."""
    from huggingface_hub.hf_api import RepoFile

    head = api.repo_info(opts.repo_id, revision=opts.revision).sha
    remote = {e.path: e for e in api.list_repo_tree(opts.repo_id, recursive=True, revision=head)
              if isinstance(e, RepoFile) and e.path not in IGNORED_REMOTE}
    added, changed, unchanged = [], [], []
    for path, item in sorted(plan.items()):
        entry = remote.get(path)
        if entry is None:
            added.append(path)
        elif (entry.lfs.sha256 if entry.lfs else entry.blob_id) == (
                item.sha256 if entry.lfs else item.git_sha1):
            unchanged.append(path)
        else:
            changed.append(path)
    return Diff(head, added, changed, unchanged, sorted(set(remote) - set(plan)))


def conflict_message(opts: PublishOptions, diff: Diff) -> str:
    where = f"{opts.repo_id}@{opts.revision}"
    what = ", ".join([f"changed: {p}" for p in diff.changed] + [f"not ours: {p}" for p in diff.extra]
                     + [f"missing there: {p}" for p in diff.added])
    return (f"{where} already holds different content ({what}); refusing to overwrite it. "
            f"Pass --overwrite to replace it (files not in this model are deleted), or "
            f"--revision NEW_BRANCH to publish on a new branch.")


def commit(api, opts: PublishOptions, plan: Plan, diff: Diff) -> str:
    """One commit: the new and changed files, and deletion of files that are not the model's."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=plan[p].content
                                    if plan[p].source is None else str(plan[p].source))
                 for p in sorted(diff.added + diff.changed)]
    ops += [CommitOperationDelete(path_in_repo=p) for p in diff.extra]
    message = opts.commit_message or (f"halos publish: {opts.run.loss} on {opts.run.dataset} "
                                      f"({opts.run.model})")
    info = api.create_commit(opts.repo_id, ops, commit_message=message, revision=opts.revision,
                             parent_commit=diff.head)
    return info.oid


def add_to_collection(api, opts: PublishOptions) -> str:
    namespace = opts.repo_id.split("/")[0]
    collection = api.create_collection(opts.collection, namespace=namespace, private=opts.private,
                                       exists_ok=True)
    api.add_collection_item(collection.slug, opts.repo_id, "model", exists_ok=True)
    return collection.slug


def _reloaded_model(opts: PublishOptions, kwargs: dict):
    """The model just uploaded; an adapter on the local base it was trained on (whose published
    repo another job may still be writing)."""
    from transformers import AutoModelForCausalLM

    if not (opts.folder / ADAPTER_CONFIG).is_file():
        return AutoModelForCausalLM.from_pretrained(opts.repo_id, **kwargs)
    from peft import PeftModel

    base = json.loads((opts.folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), opts.repo_id,
                                     **kwargs)


def reload_check(opts: PublishOptions, revision: str, prompt_suffix: str) -> dict:
    """Load tokenizer and model from the Hub revision just written (fresh cache) and generate."""
    import torch
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="halos-reload-") as cache:
        kwargs = {"revision": revision, "cache_dir": cache}
        tokenizer = AutoTokenizer.from_pretrained(opts.repo_id, **kwargs)
        model = _reloaded_model(opts, kwargs)
        messages = [{"role": "user", "content": "What is 2 plus 3?"}]
        text = (tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                if has_chat_template(opts.folder) else "Human: What is 2 plus 3?\n\nAssistant:")
        text += prompt_suffix
        local = AutoTokenizer.from_pretrained(opts.folder)(text, add_special_tokens=False)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        if inputs["input_ids"][0].tolist() != local["input_ids"]:
            raise PublishError(f"reload check: the tokenizer downloaded from {opts.repo_id}@"
                               f"{revision} encodes differently from {opts.folder}")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, inputs["input_ids"].shape[1]:]
    if new.numel() == 0:
        raise PublishError(f"reload check: {opts.repo_id}@{revision} generated no tokens")
    return {"ok": True, "commit": revision, "new_tokens": int(new.numel()),
            "text": tokenizer.decode(new, skip_special_tokens=True)}


# ------------------------------------------------------------------------------------ the flow

def publish(opts: PublishOptions, log: Log = print) -> dict:
    plan = prepare(opts)
    if opts.dry_run is not None:
        return dry_run(opts, plan, log)
    api = hub_api(opts.endpoint)
    new_branch = ensure_revision(api, opts)
    diff = remote_diff(api, opts, plan)
    where = f"{opts.repo_id}@{opts.revision}"
    if diff.clean:
        sha, status = diff.head, "unchanged"
        log(f"[halos] publish {where}: up to date at {sha}; nothing to commit")
    elif diff.remote_empty or new_branch or opts.overwrite:
        sha = commit(api, opts, plan, diff)
        status = "created" if diff.remote_empty else "updated"
        log(f"[halos] publish {where}: committed {sha} ({len(diff.added)} added, "
            f"{len(diff.changed)} changed, {len(diff.extra)} deleted)")
    else:
        raise PublishError(conflict_message(opts, diff))
    record = {"repo_id": opts.repo_id, "url": f"{api.endpoint}/{opts.repo_id}",
              "revision": opts.revision, "commit": sha, "status": status, "private": opts.private,
              "files": {p: plan[p].sha256 for p in sorted(plan)}, "collection": None,
              "reload_check": None}
    record["reload_check"] = _maybe_reload(opts, sha, status, log)
    if opts.collection:
        record["collection"] = add_to_collection(api, opts)
        log(f"[halos] publish {where}: in collection {record['collection']}")
    if opts.record is not None:
        write_json(opts.record, record)
    return record


def _maybe_reload(opts: PublishOptions, sha: str, status: str, log: Log) -> dict | None:
    """After a commit, or when no earlier record shows a passed check of this commit."""
    if not opts.reload_check:
        return None
    previous = _read_record(opts.record)
    done = previous.get("reload_check") or {}
    if status == "unchanged" and done.get("ok") and done.get("commit") == sha:
        return done
    from halos.eval import models as minfo

    info = minfo.training_info(opts.folder)
    result = reload_check(opts, sha, minfo.prompt_suffix(info) if info else "")
    log(f"[halos] publish {opts.repo_id}@{sha[:12]}: reload check passed "
        f"({result['new_tokens']} new tokens)")
    return result


def _read_record(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["CARD", "PublishError", "PublishOptions", "publish"]
