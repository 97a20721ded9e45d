"""The DAG's `publish` rule: a suite with `publish.enabled` uploads a run through `halos publish`
to the repo its template names (against the local Hub stand-in of tests/hubserver.py)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import yaml
from hubserver import FakeHub
from huggingface_hub import ModelCard
from test_hub import write_evals

from tests.test_dag import MICRO, snakemake

RUN = "results/micro/tiny-1m/synthetic/sft+dpo"


def test_publish_rule_uploads_to_the_suite_template(tmp_path: Path, tiny_model: Path) -> None:
    suite = yaml.safe_load(MICRO.read_text())
    suite["tables"] = {k: str((MICRO.parent / v).resolve()) for k, v in suite["tables"].items()}
    suite["publish"] = {"enabled": True, "org": "my-org",
                        "repo_template": "{org}/{suite}_{loss}_{model}", "private": True}
    suite_file = tmp_path / "publish-suite.yaml"
    suite_file.write_text(yaml.safe_dump(suite))

    work = tmp_path / "work"
    folder = work / RUN / "model"
    folder.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_model, folder)
    (folder / "halos_training.json").write_text(json.dumps(
        {"config": {"model": "results/tiny-1m/synthetic/sft/model", "loss": "dpo",
                    "loss_params": {"beta": 0.1}}, "loss": "dpo", "steps": 3, "world_size": 1}))
    write_evals(folder.parent / "eval")

    hub = FakeHub(token="hf_" + secrets.token_hex(16))
    hub.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=hub.token,
                   HF_HOME=str(tmp_path / "hf_home"), TQDM_DISABLE="1")
        # Only the publish rule may run: the trained run and its evals are already there.
        snakemake(work, f"{RUN}/published.json", "--cores", "1", "--config",
                  f"suite={suite_file}", "--allowed-rules", "publish", env=env, timeout=600)
    finally:
        hub.stop()

    repo = "my-org/micro_sft-dpo_tiny-1m"  # the template, with `+` made repo-safe
    record = json.loads((work / RUN / "published.json").read_text())
    assert record["repo_id"] == repo and record["status"] == "created"
    assert record["reload_check"]["ok"]
    files = hub.files(repo)
    assert files["model.safetensors"].lfs
    card = ModelCard(files["README.md"].data.decode())
    assert card.data.to_dict()["model-index"], "the card carries the eval results"
    assert hub.repos[repo].private
