"""Chat templates by name (a models-table row's or `--chat-template`'s value), so that data,
training, sampling and the tiny models render conversations the same way."""

from __future__ import annotations

# ChatML: no BOS, every turn closed by <|im_end|>, which is also the EOS the model learns to emit.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2 chat: BOS opens every [INST] exchange and EOS closes every reply, written by the
# template itself, so the tokenizer must not add another BOS.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# The Archangel/HH plain format for base models without a template (e.g. Pythia). The reply
# starts with a space (a pre-token boundary); only the final reply carries EOS, so the prompt
# rendering is a prefix of the whole conversation's.
HUMAN_ASSISTANT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n\nAssistant: ' + message['content'] }}"
    "{% if loop.last %}{{ eos_token }}{% endif %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)
CHAT_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "llama2": LLAMA2_TEMPLATE,
    "human_assistant": HUMAN_ASSISTANT_TEMPLATE,
}


def resolve_chat_template(name_or_template: str | None) -> str | None:
    """A name in CHAT_TEMPLATES, a Jinja template itself, or None (use the tokenizer's)."""
    if name_or_template is None or name_or_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES.get(name_or_template)
    if "{{" in name_or_template or "{%" in name_or_template:
        return name_or_template
    raise KeyError(f"unknown chat template {name_or_template!r}; choose from "
                   f"{sorted(CHAT_TEMPLATES)} or pass a Jinja template")
