"""`halos publish`: upload a trained model folder (with its model card) to the Hugging Face Hub.

    halos publish results/tiny/tiny-1m/synthetic/dpo/model --repo-template "{org}/{suite}_{loss}_{model}" \\
        --org my-org --suite tiny --record results/tiny/tiny-1m/synthetic/dpo/published.json
    halos publish results/tiny/tiny-1m/synthetic/dpo/model --repo my-org/tiny-dpo --dry-run /tmp/pub

The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT points the client at another server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from halos.config import ADAPTER_CONFIG_FILE
from halos.hub.card import RunId
from halos.hub.plan import PublishError, check_repo_id, repo_id_from_template
from halos.suite.paths import ADAPTER_DIR


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="halos publish", description=(
        "Publish a trained model folder (weights, tokenizer, generation config, value head, "
        "model card with eval results) to the Hugging Face Hub in one commit. Re-running commits "
        "nothing when nothing changed; a repo holding other content is not overwritten unless "
        "--overwrite or a new --revision branch is given."))
    p.add_argument("folder", type=Path, help="model folder, e.g. results/MODEL/DATASET/LOSS/model")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", help="target repo id NAMESPACE/NAME")
    where.add_argument("--repo-template", help='e.g. "{org}/{suite}_{loss}_{model}"; fields: '
                       "org, suite, model, dataset, loss")
    p.add_argument("--org", help="{org} of the template (user or organization)")
    p.add_argument("--suite", help="suite name: {suite} of the template, shown in the card")
    p.add_argument("--run", help="MODEL/DATASET/LOSS (default: from the folder's path)")
    p.add_argument("--eval-dir", type=Path, help="eval results folder (default: FOLDER/../eval)")
    p.add_argument("--base-model", help="Hub id of the base model, for the card's base_model "
                   "(and, with --adapter, the adapter config's base_model_name_or_path)")
    p.add_argument("--adapter", action="store_true",
                   help="publish the run's LoRA adapter (FOLDER/../adapter) instead of FOLDER, "
                        "the merged model")
    p.add_argument("--dataset-id", action="append", default=[], dest="datasets",
                   help="Hub id of a training dataset, for the card (repeatable)")
    p.add_argument("--license", help="license of the card metadata, e.g. apache-2.0")
    p.add_argument("--private", action=argparse.BooleanOptionalAction, default=True,
                   help="create the repo private (default: private; an existing repo keeps its "
                        "visibility)")
    p.add_argument("--revision", default="main",
                   help="branch to commit to; a branch that does not exist is created")
    p.add_argument("--overwrite", action="store_true",
                   help="replace content that differs on the target revision")
    p.add_argument("--collection", help="title of a collection (in the repo's namespace) to add "
                   "the model to; created if missing")
    p.add_argument("--no-reload-check", dest="reload_check", action="store_false",
                   help="skip reloading the model from the Hub and generating")
    p.add_argument("--record", type=Path, help="write what was published here (published.json)")
    p.add_argument("--dry-run", type=Path, metavar="DIR",
                   help="write DIR/upload/ (the exact folder) and DIR/operations.json; no requests")
    p.add_argument("--commit-message")
    return p


def options(args: argparse.Namespace):
    from halos.hub.publish import PublishOptions

    run = RunId.parse(args.run, args.suite) if args.run else RunId.from_folder(args.folder,
                                                                               args.suite)
    if args.repo:
        repo_id = check_repo_id(args.repo)
    else:
        repo_id = repo_id_from_template(args.repo_template, org=args.org, suite=args.suite,
                                        model=run.model, dataset=run.dataset, loss=run.loss)
    for dataset in args.datasets:
        check_repo_id(dataset, "--dataset-id")
    folder = args.folder
    if args.adapter:
        folder = args.folder.parent / ADAPTER_DIR
        if not (folder / ADAPTER_CONFIG_FILE).is_file():
            raise PublishError(f"--adapter: {folder} holds no LoRA adapter ({ADAPTER_CONFIG_FILE}); "
                               f"was the run trained with lora?")
    return PublishOptions(folder=folder, repo_id=repo_id, run=run,
                          eval_dir=args.eval_dir or args.folder.parent / "eval",
                          base_model=args.base_model, datasets=args.datasets,
                          license=args.license, private=args.private, revision=args.revision,
                          overwrite=args.overwrite, collection=args.collection,
                          reload_check=args.reload_check, record=args.record,
                          dry_run=args.dry_run, commit_message=args.commit_message)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub 2.x talks through `httpx2`, older versions through `httpx`/`requests`."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"),
                         ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main_publish(argv: list[str]) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from halos.hub.publish import publish

    args = build_parser().parse_args(argv)
    try:
        publish(options(args), log=lambda line: print(line, flush=True))
    except (PublishError, ValueError, FileNotFoundError) as err:
        print(f"[halos] publish failed: {err}", file=sys.stderr, flush=True)
        return 1
    except HfHubHTTPError as err:
        print(f"[halos] publish failed: the Hub answered {err}", file=sys.stderr, flush=True)
        return 1
    except _transport_errors() as err:
        print(f"[halos] publish failed: cannot reach the Hub ({type(err).__name__}: {err}); "
              f"check HF_ENDPOINT and the network", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main_publish(sys.argv[1:]))
