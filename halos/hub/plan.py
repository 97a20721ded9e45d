"""What one publish uploads: the exact files of a model repo (weights, tokenizer, generation config,
value head, training summary, README.md card), with the hashes the Hub compares, and the repo id
built from the suite's template.

The same `Plan` feeds the dry run (written to a folder) and the real commit, so the dry run's
folder is exactly what would be uploaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from halos.config import ADAPTER_CONFIG_FILE as ADAPTER_CONFIG
from halos.config import is_model_folder
from halos.files import atomic_dir
from halos.models import VALUE_HEAD_FILE

# Files of a save_pretrained folder that are published; anything else (checkpoints, optimizer
# state, pickles, logs) stays local.
UPLOAD_PATTERNS = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "merges.txt", "halos_training.json", "adapter_config.json",
)
CARD = "README.md"
# The Hub stores these as LFS (by its .gitattributes) and large files too; used by the dry run's
# listing only: the real upload mode is the Hub's answer to preupload.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model")
LFS_MIN_SIZE = 10 * 2**20
TEMPLATE_FIELDS = ("org", "suite", "model", "dataset", "loss")
_CHUNK = 2**20


class PublishError(RuntimeError):
    """Publishing cannot go on; the message names the repo or file and what to do."""


@dataclass(frozen=True)
class PlannedFile:
    path_in_repo: str
    size: int
    sha256: str
    git_sha1: str           # the git blob id: what the Hub reports for a regular (non-LFS) file
    source: Path | None     # a file of the model folder, or None for generated content
    content: bytes | None = None

    @property
    def likely_lfs(self) -> bool:
        return self.path_in_repo.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_SIZE

    def read(self) -> bytes:
        return self.content if self.content is not None else Path(self.source).read_bytes()


Plan = dict[str, PlannedFile]


def hash_bytes(data: bytes) -> tuple[str, str]:
    """(sha256, git blob sha1) of `data`."""
    git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return hashlib.sha256(data).hexdigest(), git


def hash_file(path: Path) -> tuple[int, str, str]:
    """(size, sha256, git blob sha1) of a file, read once in chunks (weights can be large)."""
    size = path.stat().st_size
    sha256, git = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            git.update(chunk)
    return size, sha256.hexdigest(), git.hexdigest()


def model_files(folder: Path) -> list[Path]:
    """The files of `folder` that are published (top level only, sorted)."""
    files = sorted(p for p in folder.iterdir() if p.is_file()
                   and any(fnmatch.fnmatch(p.name, pat) for pat in UPLOAD_PATTERNS))
    if not any(p.name.endswith(".safetensors") and p.name != VALUE_HEAD_FILE for p in files):
        raise PublishError(f"{folder}: no *.safetensors weights to publish (only safetensors "
                           f"checkpoints are uploaded; re-export with save_pretrained)")
    if not is_model_folder(folder):
        raise PublishError(f"{folder}: no config.json; is this a save_pretrained folder?")
    return files


def build_plan(folder: Path, card_text: str, base_model: str | None = None) -> Plan:
    """The files to upload and the card; an adapter's config names `base_model` (the base's Hub
    id) as its base, so that the published adapter loads from the Hub."""
    plan: Plan = {}
    for path in model_files(folder):
        size, sha256, git = hash_file(path)
        plan[path.name] = PlannedFile(path.name, size, sha256, git, source=path)
    generated = {CARD: card_text.encode()}
    if base_model and ADAPTER_CONFIG in plan:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = base_model
        generated[ADAPTER_CONFIG] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    for name, content in generated.items():
        sha256, git = hash_bytes(content)
        plan[name] = PlannedFile(name, len(content), sha256, git, source=None, content=content)
    return plan


def write_plan(plan: Plan, folder: Path) -> None:
    """Materialize the plan as a folder (the dry run's `upload/`), atomically."""
    with atomic_dir(folder) as tmp:
        for item in plan.values():
            if item.source is not None:
                shutil.copyfile(item.source, tmp / item.path_in_repo)
            else:
                (tmp / item.path_in_repo).write_bytes(item.content or b"")


def repo_id_from_template(template: str, **fields: str | None) -> str:
    """`{org}/{suite}_{loss}_{model}` with the run's names; characters a repo name may not hold
    (e.g. the `+` of `sft+kto`) become `-`. The result must be a valid `namespace/name` repo id."""
    used = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    for name in used:
        if name not in TEMPLATE_FIELDS:
            raise PublishError(f"--repo-template {template!r}: unknown field {{{name}}}; "
                               f"fields: {', '.join(TEMPLATE_FIELDS)}")
    for name in used:
        if not fields.get(name):
            raise PublishError(f"--repo-template {template!r} uses {{{name}}}: pass --{name}")
    clean = {k: re.sub(r"[^A-Za-z0-9._-]+", "-", v) for k, v in fields.items() if v}
    return check_repo_id(template.format(**clean), f"--repo-template {template!r}")


def check_repo_id(repo_id: str, where: str = "--repo") -> str:
    if repo_id.count("/") != 1:
        raise PublishError(f"{where} gives {repo_id!r}: a repo id is NAMESPACE/NAME (one '/')")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"{where} gives {repo_id!r}, not a valid repo id: {err}") from err
    if len(repo_id.split("/")[1]) > 96:
        raise PublishError(f"{where} gives {repo_id!r}: the name is longer than 96 characters")
    return repo_id
