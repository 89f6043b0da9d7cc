"""How teacher and student read the prompts: verbatim, or as conversations through each one's chat template.

A chat adapter was trained on conversations rendered by its base's template; its teacher must
read them that way, and the student (another family, another template) must read the same
conversation through its own. The continuation the teacher writes is plain text shared by
both; the token that ends the turn is each model's own (``<|im_end|>``, ``<end_of_turn>``, or
EOS without a template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..chat import ChatFormat, Message, as_conversation
from ..errors import TransferError
from .options import DistillOptions
from .prompts import PromptSet
from .student import StudentView


@dataclass
class TeacherView:
    """The teacher's reading of the prompts.

    Attributes:
        chat: whether prompts are conversations rendered through chat templates.
        template: the source's :class:`~loraport.chat.ChatFormat` (``None`` without chat).
        end_ids: tokens that end the teacher's turn (its template's end of turn, its EOS).
        add_special_tokens: encode rendered prompts with the tokenizer's default special tokens.
        max_new_tokens / stops: where its continuations end (resolved from the options and the
            prompts' kind).
        multiple_choice: the prompts are multiple-choice questions, answered in a few tokens (the
            token cap is meant to cut them).
    """

    chat: bool
    template: ChatFormat | None
    end_ids: list[int]
    add_special_tokens: bool
    max_new_tokens: int
    stops: list[str]
    multiple_choice: bool = False

    def item(self, prompt: str, given: PromptSet | None = None, index: int | None = None) -> str:
        """The identity of a prompt as the student will render it: a conversation as JSON, or the text."""
        if not self.chat:
            return prompt
        if given is not None and given.conversations is not None and index is not None:
            return json.dumps(given.conversations[index], ensure_ascii=False)
        return json.dumps(as_conversation(prompt), ensure_ascii=False)

    def render(self, item: str) -> str:
        """The text the teacher reads for an item."""
        return render_item(item, self.template)

    def describe(self) -> str:
        return self.template.describe() if self.template is not None else "none (prompts read verbatim)"


def render_item(item: str, template: ChatFormat | None) -> str:
    """An item (a conversation as JSON with a template, else a plain prompt) as its model reads it."""
    if template is None:
        return item
    messages: list[Message] = json.loads(item)
    return template.render(messages, "prompt")


def wants_chat(given: PromptSet, options: DistillOptions) -> bool:
    """Whether prompts are conversations: ``messages`` lines, ``--chat``, or a chat template passed."""
    return given.kind == "messages" or options.chat


def teacher_view(given: PromptSet, options: DistillOptions, tokenizer: Any) -> TeacherView:
    """The source's reading of ``given`` (raises a one-line error when a needed template is missing or fails)."""
    max_new_tokens, stops = options.resolved_generation(given.kind)
    if wants_chat(given, options):
        template = ChatFormat.for_tokenizer(tokenizer, options.source_chat_template, "source")
        return TeacherView(True, template, template.end_of_turn_ids(), False, max_new_tokens, stops)
    if options.source_chat_template is not None or options.target_chat_template is not None:
        raise TransferError("--source-chat-template / --target-chat-template apply to conversations: pass --chat "
                            "(plain prompts as the user's turn) or 'messages' prompts")  # fmt: skip
    eos = tokenizer.eos_token_id
    ends = [] if eos is None else [int(eos)]
    return TeacherView(False, None, ends, True, max_new_tokens, stops, given.kind == "arc")


def student_view(
    items: list[str],
    chat: bool,
    options: DistillOptions,
    tokenizer: Any,
    teacher_end_ids: list[int],
    full_support: bool,
) -> tuple[StudentView, str]:
    """The target's reading of the teacher's items and a line naming its template (for the report)."""
    share = options.token_share if options.tokens == "effect" else 1.0
    if not chat:
        eos = tokenizer.eos_token_id
        end = None if eos is None else int(eos)
        keep = full_support and end in teacher_end_ids
        return StudentView(list(items), True, end, keep, share), "none (prompts read verbatim)"
    template = ChatFormat.for_tokenizer(tokenizer, options.target_chat_template, "target")
    ends = template.end_of_turn_ids()
    end = ends[0] if ends else None
    prompts = [render_item(item, template) for item in items]
    return StudentView(prompts, False, end, full_support and end in teacher_end_ids, share), template.describe()


__all__ = ["TeacherView", "render_item", "student_view", "teacher_view", "wants_chat"]
