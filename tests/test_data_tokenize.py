"""Tokenization: prompt/response split (the loss mask), truncation, BOS/EOS exactly once, with the
ChatML template (tiny tokenizer, no BOS), Llama-2 (BOS written by the template and added by the
tokenizer) and the plain Human/Assistant format."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from halos.data.convert import paired_to_unpaired
from halos.data.errors import ErrorPolicy
from halos.data.tokenize import (
    CHAT_TEMPLATES,
    data_fingerprint,
    resolve_chat_template,
    tokenize_paired,
    tokenize_unpaired,
)
from halos.data.tokenize_cache import tokenize_split
from halos.models.tiny import train_tokenizer

CORPUS = [
    "user\nCan you help me bake bread? Sure, what kind of bread? Sourdough.",
    "assistant\nYou will need a starter, flour, water and salt. Just buy it at the store.",
    "Be brief. [INST] [/INST] <<SYS>> <</SYS>> Human: Assistant:",
] * 3
ROW = {
    "id": "bread", "source": "test",
    "prompt": [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Can you help me bake bread?"},
               {"role": "assistant", "content": "Sure, what kind of bread?"},
               {"role": "user", "content": "Sourdough."}],
    "chosen": [{"role": "assistant", "content": "You will need a starter, flour, water and salt."}],
    "rejected": [{"role": "assistant", "content": "Just buy it at the store."}],
}
LONG = 1000


@pytest.fixture(scope="module")
def chatml():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def llama():
    """Byte-level BPE whose post-processor adds <s> like Llama's tokenizer; no chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    assert fast("a")["input_ids"][0] == fast.bos_token_id  # it does add BOS by itself
    return fast


def test_chatml_multi_turn_split_and_eos_once(chatml):
    [pair], report = tokenize_paired([ROW], chatml, max_length=LONG, max_prompt_length=LONG)
    prompt_text = chatml.apply_chat_template(ROW["prompt"], tokenize=False,
                                             add_generation_prompt=True)
    assert chatml.decode(pair.prompt_ids) == prompt_text
    assert prompt_text.endswith("<|im_start|>assistant\n")
    # Only the final reply is scored; the earlier assistant turn stays in the (masked) prompt.
    assert chatml.decode(pair.chosen_ids) == ROW["chosen"][0]["content"] + "<|im_end|>"
    assert chatml.decode(pair.rejected_ids) == "Just buy it at the store.<|im_end|>"
    for ids in (pair.chosen_ids, pair.rejected_ids):
        assert ids.count(chatml.eos_token_id) == 1 and ids[-1] == chatml.eos_token_id
    assert chatml.bos_token_id not in pair.prompt_ids  # ChatML has no BOS
    full = chatml(chatml.apply_chat_template(ROW["prompt"] + ROW["chosen"], tokenize=False),
                  add_special_tokens=False)["input_ids"]
    assert pair.prompt_ids + pair.chosen_ids == full[:-1]  # all but the "\n" after <|im_end|>
    assert report.n_kept == 1 and report.n_truncated == 0 and not report.reasons


def test_llama2_no_double_bos_and_eos_once(llama):
    [pair], _ = tokenize_paired([ROW], llama, max_length=LONG, max_prompt_length=LONG,
                                chat_template="llama2")
    bos, eos = llama.bos_token_id, llama.eos_token_id
    assert pair.prompt_ids[0] == bos and pair.prompt_ids[1] != bos
    assert pair.prompt_ids.count(bos) == 2  # one per [INST] turn, none added on top
    text = llama.decode(pair.prompt_ids)
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nCan you help me bake bread?")
    assert text.endswith("</s><s>[INST] Sourdough. [/INST]")
    assert llama.decode(pair.chosen_ids) == " " + ROW["chosen"][0]["content"] + " </s>"
    for ids in (pair.chosen_ids, pair.rejected_ids):
        assert ids.count(eos) == 1 and ids[-1] == eos and bos not in ids


def test_bos_added_once_when_the_template_has_none(llama):
    [pair], _ = tokenize_paired([ROW], llama, max_length=LONG, max_prompt_length=LONG,
                                chat_template="chatml")
    assert pair.prompt_ids[0] == llama.bos_token_id
    assert pair.prompt_ids.count(llama.bos_token_id) == 1
    assert pair.chosen_ids.count(llama.eos_token_id) == 1  # appended: ChatML ends turns otherwise


def test_human_assistant_template(chatml):
    [pair], _ = tokenize_paired([ROW], chatml, max_length=LONG, max_prompt_length=LONG,
                                chat_template="human_assistant")
    assert chatml.decode(pair.prompt_ids) == (
        "Be brief.\n\nHuman: Can you help me bake bread?\n\nAssistant: Sure, what kind of bread?"
        "\n\nHuman: Sourdough.\n\nAssistant:")
    assert chatml.decode(pair.chosen_ids) == " You will need a starter, flour, water and salt.<|im_end|>"
    assert chatml.convert_ids_to_tokens(pair.chosen_ids[:1])[0].startswith("Ġ")  # seam at a space


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_truncation_keeps_prompt_end_then_cuts_responses(chatml, llama, template):
    tokenizer = chatml if template == "chatml" else llama
    [full], _ = tokenize_paired([ROW], tokenizer, max_length=LONG, max_prompt_length=LONG,
                                chat_template=template)
    max_prompt, max_length = 12, 20
    [cut], report = tokenize_paired([ROW], tokenizer, max_length=max_length,
                                    max_prompt_length=max_prompt, chat_template=template)
    assert report.n_truncated == 1
    assert report.reasons == {"truncated_prompt": 1, "truncated_response": 1}
    assert len(cut.prompt_ids) == max_prompt
    if template == "llama2":  # BOS survives left truncation
        assert cut.prompt_ids[0] == llama.bos_token_id
        assert cut.prompt_ids[1:] == full.prompt_ids[-(max_prompt - 1):]
    else:
        assert cut.prompt_ids == full.prompt_ids[-max_prompt:]
    budget = max_length - max_prompt
    assert cut.chosen_ids == full.chosen_ids[:budget]
    assert cut.rejected_ids == full.rejected_ids[:budget]


def test_response_only_truncation_keeps_prompt(chatml):
    [full], _ = tokenize_paired([ROW], chatml, max_length=LONG, max_prompt_length=LONG)
    max_length = len(full.prompt_ids) + 3
    [cut], report = tokenize_paired([ROW], chatml, max_length=max_length, max_prompt_length=LONG)
    assert cut.prompt_ids == full.prompt_ids and cut.chosen_ids == full.chosen_ids[:3]
    assert report.reasons == {"truncated_response": 1}


def test_unpaired_rows(chatml):
    rows = paired_to_unpaired([ROW])
    examples, report = tokenize_unpaired(rows, chatml, max_length=LONG, max_prompt_length=LONG)
    [pair], _ = tokenize_paired([ROW], chatml, max_length=LONG, max_prompt_length=LONG)
    assert [e.desirable for e in examples] == [True, False]
    assert examples[0].completion_ids == pair.chosen_ids
    assert examples[1].completion_ids == pair.rejected_ids
    assert examples[0].prompt_ids == pair.prompt_ids and report.n_kept == 2


def test_templates_resolve(llama):
    assert resolve_chat_template("chatml") == CHAT_TEMPLATES["chatml"]
    assert resolve_chat_template(None) is None
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(custom) == custom
    with pytest.raises(KeyError, match="choose from"):
        resolve_chat_template("vicuna")
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_paired([ROW], llama, max_length=LONG, max_prompt_length=LONG)


def test_fingerprint(chatml):
    examples, _ = tokenize_paired([ROW, {**ROW, "id": "b", "rejected": ROW["chosen"][:0] + [
        {"role": "assistant", "content": "No."}]}], chatml, max_length=LONG, max_prompt_length=LONG)
    again, _ = tokenize_paired([ROW], chatml, max_length=LONG, max_prompt_length=LONG)
    fp = data_fingerprint(examples)
    assert len(fp) == 64 and fp == data_fingerprint(list(examples))
    assert fp != data_fingerprint(examples[::-1])
    assert data_fingerprint(again) == data_fingerprint(examples[:1])
    assert data_fingerprint(again) != data_fingerprint(examples[1:])


def _variants(n: int) -> list[dict]:
    return [dict(ROW, id=f"bread-{i}", chosen=[{"role": "assistant", "content": "Yes. " * i}])
            for i in range(1, n + 1)]


def test_tokenization_cache_reads_back_exactly_what_tokenizing_gives(chatml, tmp_path):
    """One tokenization per (tokenizer, template, rows, limits): the second call reads the file,
    equal example for example; any input that changes the result is a different file."""
    rows, policy = _variants(6), ErrorPolicy.of("raise")
    options = dict(max_length=24, max_prompt_length=12, chat_template=None, policy=policy,
                   cache_dir=tmp_path)
    first, report, hit = tokenize_split(rows, chatml, "paired", **options)
    assert hit is None and report.n_truncated > 0
    again, cached_report, hit = tokenize_split(rows, chatml, "paired", **options)
    assert hit is not None and again == first
    assert (cached_report.n_in, cached_report.n_kept, cached_report.n_truncated,
            cached_report.reasons) == (6, 6, report.n_truncated, report.reasons)
    unpaired = paired_to_unpaired(rows, seed=0)
    labelled, _, _ = tokenize_split(unpaired, chatml, "unpaired", **options)
    assert tokenize_split(unpaired, chatml, "unpaired", **options)[:2][0] == labelled
    assert {e.desirable for e in labelled} == {True, False}
    for change in (dict(max_length=40), dict(chat_template="human_assistant")):
        assert tokenize_split(rows, chatml, "paired", **{**options, **change})[2] is None
    assert tokenize_split(rows[:5], chatml, "paired", **options)[2] is None
    assert len(list(tmp_path.glob("*.npz"))) == 5


def test_tokenization_cache_skips_a_folder_it_cannot_write(chatml, tmp_path):
    (tmp_path / "data").write_text("")  # a file where the folder would go (root ignores modes)
    options = dict(max_length=LONG, max_prompt_length=LONG, chat_template=None,
                   policy=ErrorPolicy.of("raise"), cache_dir=tmp_path / "data" / ".tokenized")
    for _ in range(2):
        examples, _, hit = tokenize_split(_variants(2), chatml, "paired", **options)
        assert hit is None and len(examples) == 2
