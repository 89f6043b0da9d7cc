"""Conversations and chat templates: what a chat model sees, and the token that ends its turn.

A chat adapter is trained on conversations rendered through its base's chat template (the
Jinja template a tokenizer carries, ``tokenizer.chat_template``); judged or distilled on bare
strings it answers something else, or ends its turn at once. :class:`ChatFormat` renders an
OpenAI-style conversation (a list of ``{"role", "content"}``) the way the model was trained
to read it, with the assistant's turn opened (``add_generation_prompt=True``), and finds the
token that closes an assistant turn (``<|im_end|>``, ``<end_of_turn>``, ...) by rendering one.
A base without a template (a GGUF pretrained base often has none) takes one from a file.

Example::

    >>> fmt = ChatFormat.for_tokenizer(tokenizer, template_file=None, role="source")  # doctest: +SKIP
    >>> fmt.render([{"role": "user", "content": "Hi"}])                                  # doctest: +SKIP
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LoraportError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
_PROBE = "\u2063loraport-probe\u2063"  # text no template changes, to find what follows an assistant turn


def check_messages(messages: Any, where: str) -> list[Message]:
    """An OpenAI-style conversation, checked: a non-empty list of ``{role, content}`` with known roles,
    string contents, ending with a user (or system) turn for the assistant to answer.

    Raises:
        LoraportError: one line naming ``where`` and what is wrong.
    """
    if not isinstance(messages, list):
        raise LoraportError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if not messages:
        raise LoraportError(f"{where}: 'messages' is an empty conversation")
    checked: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise LoraportError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise LoraportError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise LoraportError(f"{where}: message {i}'s 'content' must be a string")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] == "assistant":
        raise LoraportError(f"{where}: the conversation ends with an assistant turn; the last message must be the "
                            "user's (the model answers it)")  # fmt: skip
    if not any(m["content"].strip() for m in checked if m["role"] == "user"):
        raise LoraportError(f"{where}: the conversation has no non-empty user message")
    return checked


BUILTIN_TEMPLATES = ("gemma", "chatml")  # src/loraport/templates/NAME.jinja


def read_template(path: str | os.PathLike[str]) -> str:
    """A Jinja chat template from a file, or a built-in one by name (:data:`BUILTIN_TEMPLATES`: ``gemma`` for
    a Gemma base without a template, ``chatml``); one-line error when it cannot be read."""
    file = Path(path)
    if str(path) in BUILTIN_TEMPLATES and not file.exists():
        file = Path(__file__).parent / "templates" / f"{path}.jinja"
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoraportError(f"{file}: chat template file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LoraportError(f"{file}: cannot read the chat template ({exc})") from None
    if not text.strip():
        raise LoraportError(f"{file}: the chat template file is empty")
    return text


@dataclass
class ChatFormat:
    """A tokenizer with the chat template it renders conversations through.

    Attributes:
        tokenizer: a ``transformers`` tokenizer.
        template: the Jinja template (the tokenizer's own or a file's).
        name: what the report calls it (``the tokenizer's own chat template`` or the file).
        digest: a short digest of the template text (cache keys, reports).
    """

    tokenizer: Any
    template: str
    name: str
    digest: str

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, template_file: str | os.PathLike[str] | None, role: str, flag: str | None = None
    ) -> ChatFormat:
        """The chat format of a base: ``template_file`` if given, else the tokenizer's own template.

        ``role`` names the base in errors (``source``, ``target``, ``model``); ``flag`` is the option that
        passes a template file for it (default ``--ROLE-chat-template``).
        """
        flag = flag or f"--{role}-chat-template"
        if template_file is not None:
            template, name = read_template(template_file), f"template file {template_file}"
        else:
            own = getattr(tokenizer, "chat_template", None)
            if isinstance(own, dict):  # several named templates: the default one
                own = own.get("default")
            if not own:
                raise LoraportError(
                    f"the {role} base's tokenizer has no chat template: pass {flag} FILE (a Jinja chat template)"
                )
            template, name = own, "the tokenizer's own chat template"
        digest = hashlib.sha256(template.encode()).hexdigest()[:12]
        fmt = cls(tokenizer, template, name, digest)
        fmt.render([{"role": "user", "content": "Hello"}], where=f"the {role} chat template ({name})")
        return fmt

    def render(self, messages: Sequence[Message], where: str = "chat template") -> str:
        """The conversation as the model reads it, with the assistant's turn opened (a string)."""
        return self._apply(list(messages), True, where)

    def _apply(self, messages: list[Message], generation_prompt: bool, where: str) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.template
            )
        except Exception as exc:  # jinja2's TemplateError and whatever a template raises
            detail = " ".join(str(exc).split()) or type(exc).__name__
            name = type(exc).__name__
            raise LoraportError(f"{where}: the chat template fails to render ({name}: {detail})") from None
        if not isinstance(text, str):
            raise LoraportError(f"{where}: the chat template rendered {type(text).__name__}, not text")
        return text

    def end_of_turn_ids(self) -> list[int]:
        """Token ids that end an assistant turn: the special token the template writes after an assistant
        message (if any), then the tokenizer's EOS."""
        ids: list[int] = []
        try:
            closed = self._apply(
                [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _PROBE}], False, "probe"
            )
        except LoraportError:
            closed = ""
        at = closed.find(_PROBE)
        if at >= 0:
            after = closed[at + len(_PROBE) :]
            encoded = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
            specials = set(getattr(self.tokenizer, "all_special_ids", []) or [])
            added = set(getattr(self.tokenizer, "added_tokens_decoder", {}) or {})
            if encoded and (encoded[0] in specials or encoded[0] in added):
                ids.append(int(encoded[0]))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and int(eos) not in ids:
            ids.append(int(eos))
        return ids

    def describe(self) -> str:
        return f"{self.name} (sha256 {self.digest})"


def as_conversation(prompt: str) -> list[Message]:
    """A plain prompt as a one-turn conversation (``--chat``)."""
    return [{"role": "user", "content": prompt}]


__all__ = ["BUILTIN_TEMPLATES", "ROLES", "ChatFormat", "Message", "as_conversation", "check_messages", "read_template"]
