"""Built-in tiny Llama-style models and a locally trained byte-level BPE tokenizer.

Everything here works offline: the tokenizer is trained with the `tokenizers` library on a local
corpus, the model is randomly initialised, and both are saved as an ordinary Hugging Face folder
that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load like any hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from halos.data.templates import CHATML_TEMPLATE
from halos.files import atomic_dir

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|im_end|>"
TURN_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, TURN_START]

@dataclass(frozen=True)
class TinySize:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


# Parameter counts are for a 2k-token vocabulary with tied embeddings; the names round them.
TINY_SIZES: dict[str, TinySize] = {
    "tiny-1m": TinySize(hidden_size=128, num_layers=3, num_heads=4, intermediate_size=384),
    "tiny-3m": TinySize(hidden_size=192, num_layers=5, num_heads=4, intermediate_size=512),
    "tiny-8m": TinySize(hidden_size=256, num_layers=8, num_heads=4, intermediate_size=688),
    "tiny-20m": TinySize(hidden_size=384, num_layers=10, num_heads=6, intermediate_size=1024),
}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, chat_template: str = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (any byte sequence stays encodable)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        model_max_length=2048,
    )
    fast.chat_template = chat_template
    return fast


def build_tiny_model(size: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                     max_position_embeddings: int = 1024) -> LlamaForCausalLM:
    """A randomly initialised Llama of one of `TINY_SIZES`, sized to `tokenizer`'s vocabulary."""
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose from {sorted(TINY_SIZES)}")
    s = TINY_SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(out_dir: str | Path, size: str, corpus: Iterable[str], vocab_size: int = 2048,
                    seed: int = 0) -> Path:
    """Train a tokenizer on `corpus`, build the model, write a Hugging Face folder atomically."""
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    model = build_tiny_model(size, tokenizer, seed=seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=64,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
