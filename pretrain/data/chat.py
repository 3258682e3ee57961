"""Conversations as token ids with a loss mask: a chat template renders the messages, and the
tokens of the assistant's turns are the ones a fine-tuned model learns to produce.

The template is Jinja, as transformers' `apply_chat_template` runs it (this module renders
through transformers, so an export's `tokenizer.apply_chat_template` gives the same ids):
the tokenizer's own when its directory has one (`tokenizer_config.json`'s `chat_template`,
or `chat_template.jinja`), a file named by `data.chat_template`, or `DEFAULT_TEMPLATE`,
ChatML, whose two special tokens are added to the tokenizer when it lacks them.

Which tokens are the assistant's: for each assistant message, the text the template renders
for the conversation up to that message, less the text it renders for the conversation
before it with the generation prompt (`<|im_start|>assistant\\n`): the reply and the end of
its turn. The whole conversation is tokenized once, and a token is learned when its first
character lies in such a span. A template that does not render a conversation's beginning
the same way as the whole (one that rewrites earlier turns) is refused, naming the turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""The chat template a fine-tuning run's checkpoints carry (data=sft)."""
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, and
`<|im_start|>assistant\\n` as the generation prompt."""
ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A record that is not a conversation this module can render."""


def messages_of(record: Any) -> list[dict[str, str]]:
    """A record's conversation: `{"messages": [{"role", "content"}, ...]}`, or
    `{"prompt", "completion"}` (a user turn and the assistant's reply)."""
    if not isinstance(record, dict):
        raise ConversationError(f"a {type(record).__name__}, not an object")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]  # fmt: skip
    else:
        raise ConversationError(
            f"no 'messages' (nor 'prompt' and 'completion'); its keys: {sorted(record)}"
        )
    if not isinstance(messages, list) or not messages:
        raise ConversationError("'messages' is not a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ConversationError(f"message {i} has no role of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ConversationError(f"message {i}'s content is not a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ConversationError("no assistant message: nothing to learn")
    if out[0]["role"] == "assistant":
        raise ConversationError("it opens with the assistant: no message prompts the reply")
    return out


def own_template(source: str | Path) -> str | None:
    """The chat template a tokenizer's directory holds (tokenizer_config.json's, or
    chat_template.jinja), or None."""
    directory = Path(source)
    if not directory.is_dir():
        return None
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a reply: the end-of-text token, and the end of a ChatML turn when
    the tokenizer has it."""
    ids = [tokenizer.token_to_id(t) for t in ("<|eos|>", TURN_END)]
    return [i for i in ids if i is not None]


@dataclass
class Rendered:
    """One conversation as the model sees it."""

    ids: list[int]
    learn: list[bool]
    """Per token: the assistant's (a target the loss counts)."""


class ChatRenderer:
    """Renders conversations with `template` and tokenizes them with `tokenizer` (a
    `tokenizers.Tokenizer`), as transformers' `apply_chat_template` does."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        from transformers import PreTrainedTokenizerFast

        self.tokenizer, self.template = tokenizer, template
        specials = {name: token for name, token in
                    (("bos_token", "<|bos|>"), ("eos_token", "<|eos|>"), ("pad_token", "<|pad|>"))
                    if tokenizer.token_to_id(token) is not None}  # fmt: skip
        self._hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)
        self._hf.chat_template = template

    def text(self, messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
        """The template's text of `messages` (with the assistant's generation prompt)."""
        return self._hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The ids that prompt the assistant's next reply (tools/generate.py --chat)."""
        return self.tokenizer.encode(self.text(messages, True), add_special_tokens=False).ids

    def render(self, messages: Sequence[dict[str, str]]) -> Rendered:
        """The conversation's ids, and which of them are the assistant's."""
        full = self.text(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.text(messages[:i], generation_prompt=True)
            upto = self.text(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ConversationError(
                    f"the chat template renders the conversation up to message {i} otherwise "
                    "than as the beginning of the whole: the assistant's tokens cannot be "
                    "told apart (a template that rewrites earlier turns); set "
                    "data.chat_template to one that does not"
                )
            spans.append((len(before), len(upto)))
        encoding = self.tokenizer.encode(full, add_special_tokens=False)
        learn = [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
        return Rendered(list(encoding.ids), learn)


def with_template_tokens(tokenizer: Any, template: str) -> list[str]:
    """Add the special tokens `DEFAULT_TEMPLATE` needs to `tokenizer` when it lacks them;
    returns those added (their ids follow the tokenizer's last)."""
    if template != DEFAULT_TEMPLATE:
        return []
    missing = [t for t in (TURN_START, TURN_END) if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return missing
