"""`halos publish` against a local stand-in for the Hub (tests/hubserver.py): the real
huggingface_hub client, the card's YAML read back, LFS for weights, idempotence, overwrite
protection, branches, collections, the reload check and the token never leaving the headers."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubserver import FakeHub, git_blob_sha1
from huggingface_hub import ModelCard, constants

from halos.hub.card import RunId
from halos.hub.plan import PublishError, build_plan, repo_id_from_template
from halos.hub.publish import PublishOptions, publish

REPO = "my-org/tiny_dpo_tiny-1m"
TRAINING = {"config": {"model": "results/tiny-1m/synthetic/sft/model", "data": "data/synthetic",
                       "loss": "dpo", "loss_params": {"beta": 0.1}, "learning_rate": 5e-5,
                       "epochs": 1, "seed": 0},
            "loss": "dpo", "steps": 94, "world_size": 1, "final_eval": {}}
JUDGE = {"judge": "synthetic", "n": 100, "wins": 80, "ties": 5, "losses": 15, "win_rate": 0.825,
         "ci90": [0.76, 0.88], "p_value": 1.5e-9}
PREFERENCE = {"reward_accuracy": 0.78, "reward_margin": 1.25, "logp_accuracy": None}
LM_EVAL = {"tasks": {"adder_mc": {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.55}}}


def make_run(root: Path, model_src: Path | None = None, evals: bool = True) -> Path:
    """results/tiny-1m/synthetic/dpo/{model,eval}: a real tiny model folder or small fake files."""
    folder = root / "results" / "tiny-1m" / "synthetic" / "dpo" / "model"
    if model_src is not None:
        shutil.copytree(model_src, folder)
    else:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(os.urandom(4096))
        (folder / "config.json").write_text('{"model_type": "llama"}\n')
        (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
        (folder / "optimizer.pt").write_bytes(b"not published")
    (folder / "halos_training.json").write_text(json.dumps(TRAINING))
    if evals:
        write_evals(folder.parent / "eval")
    return folder


def write_evals(out: Path, **judge: object) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge.json").write_text(json.dumps({**JUDGE, **judge}))
    (out / "preference.json").write_text(json.dumps(PREFERENCE))
    (out / "lm_eval.json").write_text(json.dumps(LM_EVAL))


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub(token="hf_" + secrets.token_hex(16))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def online(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """In-process publishing against `hub` (conftest makes the test process offline)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    return hub


def options(folder: Path, hub: FakeHub, **kw: object) -> PublishOptions:
    kw = {"reload_check": False, "endpoint": hub.url, **kw}
    return PublishOptions(folder=folder, repo_id=REPO, run=RunId.from_folder(folder, "tiny"), **kw)


def commits(hub: FakeHub) -> list:
    return hub.calls("POST", r"/commit/")


# ------------------------------------------------------------------------------ offline parts

def test_repo_template_fields_and_validation() -> None:
    ok = repo_id_from_template("{org}/{suite}_{loss}_{model}", org="my-org", suite="tiny",
                               model="tiny-1m", dataset="synthetic", loss="sft+kto")
    assert ok == "my-org/tiny_sft-kto_tiny-1m"
    with pytest.raises(PublishError, match="unknown field {size}"):
        repo_id_from_template("{org}/{size}", org="o")
    with pytest.raises(PublishError, match="pass --org"):
        repo_id_from_template("{org}/{loss}", loss="dpo")
    with pytest.raises(PublishError, match="NAMESPACE/NAME"):
        repo_id_from_template("{loss}", loss="dpo")
    with pytest.raises(PublishError, match="not a valid repo id"):
        repo_id_from_template("{org}/--{loss}", org="o", loss="dpo")


def test_card_yaml_loads_back_with_eval_results(tmp_path: Path) -> None:
    from halos.hub.card import build_card
    from halos.hub.publish import card_inputs

    folder = make_run(tmp_path)
    opts = PublishOptions(folder=folder, repo_id=REPO, run=RunId.from_folder(folder, "tiny"),
                          base_model="EleutherAI/pythia-1.4b", datasets=["Anthropic/hh-rlhf"])
    (tmp_path / "README.md").write_text(str(build_card(card_inputs(opts))))
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.base_model == "EleutherAI/pythia-1.4b" and data.datasets == ["Anthropic/hh-rlhf"]
    assert data.halos["loss"] == "dpo" and data.halos["loss_params"] == {"beta": 0.1}
    assert data.halos["suite"] == "tiny" and "tiny" in data.tags
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics["win_rate"] == 0.825
    assert (metrics["win_rate_ci90_low"], metrics["win_rate_ci90_high"]) == (0.76, 0.88)
    assert metrics["p_value"] == pytest.approx(1.5e-9)
    assert metrics["reward_accuracy"] == 0.78 and "logp_accuracy" not in metrics
    assert (metrics["acc"], metrics["acc_norm"]) == (0.5, 0.55) and "acc_stderr" not in metrics
    assert "apply_chat_template" not in card.text  # the fake folder has no chat template
    assert '"learning_rate": 5e-05' in card.text and REPO in card.text


def test_card_without_eval_files(tmp_path: Path) -> None:
    from halos.hub.card import build_card
    from halos.hub.publish import card_inputs

    folder = make_run(tmp_path, evals=False)
    opts = PublishOptions(folder=folder, repo_id=REPO, run=RunId.from_folder(folder))
    card = ModelCard(str(build_card(card_inputs(opts))))
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "No evaluation results" in card.text


def test_plan_files_and_hashes(tmp_path: Path) -> None:
    folder = make_run(tmp_path)
    (folder / "value_head.safetensors").write_bytes(b"head")
    (folder / "checkpoints").mkdir()
    plan = build_plan(folder, "---\nlicense: mit\n---\ncard\n")
    assert sorted(plan) == ["README.md", "config.json", "halos_training.json",
                            "model.safetensors", "tokenizer.json", "value_head.safetensors"]
    item = plan["config.json"]
    assert item.git_sha1 == git_blob_sha1((folder / "config.json").read_bytes())
    assert plan["model.safetensors"].likely_lfs and not item.likely_lfs
    (folder / "model.safetensors").unlink()
    with pytest.raises(PublishError, match="no \\*.safetensors weights"):
        build_plan(folder, "")


def test_dry_run_writes_folder_and_operations_without_requests(tmp_path: Path,
                                                               hub: FakeHub) -> None:
    folder = make_run(tmp_path)
    out = tmp_path / "dry"
    lines: list[str] = []
    publish(options(folder, hub, dry_run=out, collection="tiny suite",
                    record=tmp_path / "published.json"), log=lines.append)
    uploaded = sorted(p.name for p in (out / "upload").iterdir())
    assert uploaded == ["README.md", "config.json", "halos_training.json", "model.safetensors",
                        "tokenizer.json"]
    assert (out / "upload" / "model.safetensors").read_bytes() == \
        (folder / "model.safetensors").read_bytes()
    ops = json.loads((out / "operations.json").read_text())["operations"]
    assert [op["op"] for op in ops] == ["create_repo", "create_commit", "add_collection_item"]
    modes = {f["path"]: f["upload"] for f in ops[1]["add"]}
    assert modes["model.safetensors"] == "lfs" and modes["README.md"] == "regular"
    assert any("add model.safetensors" in line for line in lines)
    assert json.loads((tmp_path / "published.json").read_text())["status"] == "dry-run"
    assert hub.requests == []


# ------------------------------------------------------------------- against the local server

def test_publish_commits_once_and_is_idempotent(tmp_path: Path, online: FakeHub) -> None:
    hub, folder = online, make_run(tmp_path)
    record = tmp_path / "published.json"
    first = publish(options(folder, hub, record=record), log=lambda _: None)
    assert first["status"] == "created" and len(commits(hub)) == 1
    files = hub.files(REPO)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "halos_training.json"):
        assert files[name].data == (folder / name).read_bytes()
    assert "optimizer.pt" not in files
    assert files["model.safetensors"].lfs and not files["config.json"].lfs
    assert [r.json()["objects"][0]["oid"] for r in hub.calls("POST", r"lfs/objects/batch")] == \
        [first["files"]["model.safetensors"]]
    assert ModelCard(files["README.md"].data.decode()).data.eval_results
    assert hub.repos[REPO].private
    assert json.loads(record.read_text())["commit"] == hub.repos[REPO].branches["main"]

    before = len(hub.requests)
    second = publish(options(folder, hub, record=record), log=lambda _: None)
    assert second["status"] == "unchanged" and second["commit"] == first["commit"]
    later = [r.path for r in hub.requests[before:]]
    assert not [p for p in later if "/commit/" in p or "/preupload/" in p or "lfs" in p], later


def test_different_content_is_not_overwritten(tmp_path: Path, online: FakeHub) -> None:
    hub, folder = online, make_run(tmp_path)
    publish(options(folder, hub), log=lambda _: None)
    head = hub.repos[REPO].branches["main"]
    write_evals(folder.parent / "eval", win_rate=0.9)  # a new card
    with pytest.raises(PublishError) as err:
        publish(options(folder, hub), log=lambda _: None)
    message = str(err.value)
    assert REPO in message and "README.md" in message
    assert "--overwrite" in message and "--revision" in message
    assert hub.repos[REPO].branches["main"] == head and len(commits(hub)) == 1

    # a new branch: main stays as it was
    branch = publish(options(folder, hub, revision="v2"), log=lambda _: None)
    assert hub.repos[REPO].branches["main"] == head
    assert hub.files(REPO, "v2")["README.md"].data != hub.files(REPO)["README.md"].data
    assert branch["status"] == "updated" and branch["revision"] == "v2"


def test_overwrite_commits_only_changes_and_removes_foreign_files(tmp_path: Path,
                                                                  online: FakeHub) -> None:
    hub, folder = online, make_run(tmp_path)
    publish(options(folder, hub), log=lambda _: None)
    repo = hub.repos[REPO]
    files = dict(hub.files(REPO))
    files["stale.bin"] = files["config.json"]
    head = repo.commit("main", "someone else's file", files).sha
    write_evals(folder.parent / "eval", win_rate=0.9)
    result = publish(options(folder, hub, overwrite=True), log=lambda _: None)
    assert result["status"] == "updated"
    lines = [json.loads(line) for line in commits(hub)[-1].body.splitlines()]
    assert [(x["key"], x["value"]["path"]) for x in lines[1:]] == \
        [("file", "README.md"), ("deletedFile", "stale.bin")]
    assert lines[0]["value"]["parentCommit"] == head  # a concurrent push would be refused
    assert "stale.bin" not in hub.files(REPO) and ".gitattributes" in hub.files(REPO)
    readme = ModelCard(hub.files(REPO)["README.md"].data.decode())
    assert {r.metric_type: r.metric_value for r in readme.data.eval_results}["win_rate"] == 0.9


def test_collection_and_missing_token(tmp_path: Path, online: FakeHub,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hub, folder = online, make_run(tmp_path)
    first = publish(options(folder, hub, collection="tiny suite"), log=lambda _: None)
    again = publish(options(folder, hub, collection="tiny suite"), log=lambda _: None)
    assert first["collection"] == again["collection"]
    (collection,) = hub.collections.values()
    assert [i["id"] for i in collection["items"]] == [REPO]
    assert collection["owner"]["name"] == "my-org" and collection["private"]
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PublishError, match="HF_TOKEN"):
        publish(options(folder, hub), log=lambda _: None)


# ----------------------------------------------------------- the CLI, end to end, in a subprocess

def test_cli_publish_reload_check_and_token_never_leaks(tmp_path: Path, hub: FakeHub,
                                                        tiny_model: Path) -> None:
    folder = make_run(tmp_path, model_src=tiny_model)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=hub.token,
               HF_HOME=str(tmp_path / "hf_home"), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    record = folder.parent / "published.json"
    command = [sys.executable, "-m", "halos.hub.cli", str(folder), "--repo-template",
               "{org}/{suite}_{loss}_{model}", "--org", "my-org", "--suite", "tiny",
               "--record", str(record), "--collection", "tiny suite"]
    outputs = []
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=300)
        outputs += [result.stdout, result.stderr]
        assert result.returncode == 0, result.stdout + result.stderr
    assert len(commits(hub)) == 1, "the second run must not commit"
    saved = json.loads(record.read_text())
    assert saved["status"] == "unchanged" and saved["repo_id"] == REPO
    assert saved["reload_check"]["ok"] and saved["reload_check"]["commit"] == saved["commit"]
    resolved = {r.path.rsplit("/", 1)[1] for r in hub.calls("GET", r"/resolve/")}
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= resolved
    assert all(saved["commit"] in r.path for r in hub.calls("GET", r"/resolve/"))
    assert hub.files(REPO)["model.safetensors"].lfs
    assert not [r.path for r in hub.requests if not r.handled]

    token = hub.token.encode()
    assert all(r.headers.get("authorization") == f"Bearer {hub.token}"
               for r in hub.calls("POST", r"/commit/"))  # headers carry it by design
    assert not [b for b in hub.received_bytes() if token in b], "token in a request body"
    assert not [o for o in outputs if hub.token in o], "token printed"
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and token in p.read_bytes()]
    assert not leaked, leaked
