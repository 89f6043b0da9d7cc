"""Distillation: the source adapter is the teacher, a new LoRA on the target learns from it on unlabeled inputs.

The only method that carries an adapter across model families (other tokenizer, widths, depth,
training): closed-form ports map weights, and unrelated bases share no coordinates to map them
in. Here the *behaviour* moves instead:

1. **Teacher** (:mod:`.teacher`): the source base with the adapter writes a continuation of each
   prompt and gives its next-token distributions on ``prompt + continuation``; both are cached
   on disk and the teacher is freed before the student is loaded.
2. **Student** (:mod:`.student`): the target base with a new LoRA on its projections (the
   adapter's rank), started from the best closed-form port (``--init``), learns the teacher's
   continuation (sequence level) and its next-token distribution at the positions that line up
   (every position with one tokenizer; across tokenizers the positions whose tokens end at the
   same character, over the tokens both vocabularies share). Only the LoRA factors train.
3. **No harm** (:class:`Distiller`): a share of the prompts is held out; the adapter written is
   the better of the start port and the distilled one by held-out agreement with the teacher,
   and the report gives agreement, KL and the target's perplexity change on generic text.

Training is resumable and deterministic for a seed (:mod:`.train`).
"""

from .distiller import Distiller, distilled_is_better
from .options import DEFAULT_MAX_STEPS, DISTILL, DISTILL_FIELDS, DistillOptions, distill_summary

__all__ = [
    "DEFAULT_MAX_STEPS",
    "DISTILL",
    "DISTILL_FIELDS",
    "DistillOptions",
    "Distiller",
    "distill_summary",
    "distilled_is_better",
]
