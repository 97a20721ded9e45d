"""What a trained model folder says about itself: its training summary, loss, size."""

from __future__ import annotations

import json
from pathlib import Path

from halos.config import is_model_folder
from halos.models import VALUE_HEAD_FILE

TRAINING_FILE = "halos_training.json"
DEFAULT_BETA = 0.1


def model_folder(model: str | Path) -> Path:
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {str(model)!r}: not a model folder (expected a Hugging "
                                f"Face folder such as results/M/D/LOSS/model)")
    if not is_model_folder(path):
        raise FileNotFoundError(f"--model {str(model)!r}: no config.json; is this a saved model?")
    return path


def training_info(model: str | Path) -> dict:
    """The folder's halos_training.json ({} for a base model that halos did not train)."""
    path = Path(model) / TRAINING_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return info if isinstance(info, dict) else {}


def loss_name(info: dict) -> str | None:
    return info.get("loss") or info.get("config", {}).get("loss")


def loss_params(info: dict) -> dict:
    return dict(info.get("config", {}).get("loss_params") or {})


def chat_template(info: dict) -> str | None:
    """config.chat_template of the run ('' or absent = the tokenizer's own)."""
    return info.get("config", {}).get("chat_template") or None


def beta(info: dict) -> float:
    value = loss_params(info).get("beta")
    if value is None and loss_name(info):
        try:
            from halos.losses import get_loss_class

            param = get_loss_class(loss_name(info)).hyperparameters().get("beta")
            value = None if param is None else param.default
        except KeyError:
            value = None
    return float(value) if isinstance(value, (int, float)) else DEFAULT_BETA


def prompt_suffix(info: dict) -> str:
    """Text the loss appends to a prompt at sampling time (CSFT's `<|good|>`), else ''."""
    name = loss_name(info)
    if not name:
        return ""
    from halos.losses import build_loss, get_loss_class

    try:
        loss = build_loss(name, loss_params(info))
    except (KeyError, ValueError, TypeError):
        try:
            loss = get_loss_class(name)()
        except KeyError:
            return ""
    return loss.prompt_suffix(True)


def parameter_count(model: str | Path) -> int | None:
    """Parameters stored in the folder's safetensors files (headers only, no weights loaded);
    the value head of a reward model is not counted. None if there are none."""
    folder = Path(model)
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != VALUE_HEAD_FILE]
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in meta["shape"]:
                count *= dim
            total += count
    return total
