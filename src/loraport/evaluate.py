"""ARC-format multiple-choice scoring, the same numbers as lm-evaluation-harness ``arc_challenge``.

Data: JSONL, one question a line::

    {"id": "q1", "question": "Which is a mammal?",
     "choices": {"text": ["trout", "whale", "frog"], "label": ["A", "B", "C"]}, "answerKey": "B"}

Each choice is a request ``(context, continuation)`` with context
``"Question: {question}\\nAnswer:"`` and continuation ``" " + choice``; its score is the
summed log-likelihood of the continuation tokens. ``acc`` takes the argmax of the scores,
``acc_norm`` the argmax of score / ``len(choice)`` (characters of the choice text, without
the leading space: lm-eval's ``process_results`` divides by ``len(doc_to_choice(doc)[i])``).
Ties go to the first choice (``np.argmax``).

Tokenisation follows lm-eval 0.4.13's ``HFLM``: trailing whitespace of the context moves
to the continuation, ``context + continuation`` is encoded whole and split at the length
of the encoded context, with the tokenizer's default special tokens (so a BOS is added
where the tokenizer adds one) unless ``add_bos_token`` says otherwise or the text already
starts with the BOS string (lm-eval's ``add_bos_token=None`` default since
EleutherAI/lm-evaluation-harness#3347, autumn 2025). Older releases encoded without special
tokens by default (except Gemma): pass ``add_bos_token=False`` to reproduce their numbers.
Sequences longer than the model's context keep their last ``max_length + 1`` tokens, as
lm-eval does.

One difference by design: log-softmax runs in float32 whatever the model dtype (lm-eval
runs it in the model dtype), so bf16 models get slightly more accurate scores.

Example::

    >>> result = evaluate_path("tiny-llama", "arc.jsonl", adapter="tiny-lora")  # doctest: +SKIP
    >>> print(result.acc, result.acc_norm, result.n)                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import gguf_lora_file, load_adapter, save_adapter
from .errors import AdapterError, CheckpointError, LoraportError

PROMPT = "Question: {question}\nAnswer:"
TARGET_DELIMITER = " "
DEFAULT_MAX_LENGTH = 2048
# Most logits (rows x positions x vocabulary) one forward pass may produce: 2^27 floats = 512 MB.
LOGIT_BUDGET = 2**27
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


@dataclass
class EvalResult:
    """Accuracy on a multiple-choice set; stderr is the sample std / sqrt(n) (None when n < 2)."""

    acc: float
    acc_norm: float
    n: int
    acc_stderr: float | None = None
    acc_norm_stderr: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def fmt(value: float, err: float | None) -> str:
            return f"{value:.4f}" + (f" (+/- {err:.4f})" if err is not None else "")

        return (
            f"acc {fmt(self.acc, self.acc_stderr)}  acc_norm {fmt(self.acc_norm, self.acc_norm_stderr)}  "
            f"n {self.n}  {self.seconds:.1f}s"
        )


# -- data -------------------------------------------------------------------------------


def validate_example(record: Any, where: str = "example") -> dict:
    """Check one ARC record; return it unchanged. ``where`` names it in the error ("FILE line 3")."""

    def fail(what: str) -> LoraportError:
        return LoraportError(f"{where}: {what}")

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("question", "choices", "answerKey") if key not in record]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}; expected id, question, choices{{text,label}}, answerKey")
    question, choices, answer = record["question"], record["choices"], record["answerKey"]
    if not isinstance(question, str) or not question.strip():
        raise fail("'question' must be a non-empty string")
    if (
        not isinstance(choices, dict)
        or not isinstance(choices.get("text"), list)
        or not isinstance(choices.get("label"), list)
    ):
        raise fail("'choices' must be an object with lists 'text' and 'label'")
    texts, labels = choices["text"], choices["label"]
    if len(texts) != len(labels):
        raise fail(f"'choices' has {len(texts)} texts but {len(labels)} labels")
    if len(texts) < 2:
        raise fail(f"need at least 2 choices, got {len(texts)}")
    if not all(isinstance(t, str) and t for t in texts):
        raise fail("every choice text must be a non-empty string (acc_norm divides by its length)")
    if not all(isinstance(label, str) for label in labels) or len(set(labels)) != len(labels):
        raise fail(f"choice labels must be distinct strings, got {labels!r}")
    if not isinstance(answer, str) or answer not in labels:
        raise fail(f"answerKey {answer!r} is not one of the choice labels {labels!r}")
    return record


def load_arc_jsonl(path: str | os.PathLike[str], limit: int | None = None) -> list[dict]:
    """Read and validate an ARC JSONL file (blank lines skipped); the first ``limit`` records if given."""
    path = Path(path)
    if not path.is_file():
        raise LoraportError(f"{path}: no such data file (expected ARC JSONL)")
    if limit is not None and limit < 1:
        raise LoraportError(f"limit must be >= 1, got {limit}")
    examples: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LoraportError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
            examples.append(validate_example(record, f"{path} line {lineno}"))
    if not examples:
        raise LoraportError(f"{path}: no questions found (expected ARC JSONL, one object a line)")
    return examples


def arc_requests(example: dict) -> tuple[str, list[str], int]:
    """``(context, continuations, gold index)`` of one validated ARC record."""
    context = PROMPT.format(question=example["question"])
    choices = example["choices"]
    continuations = [TARGET_DELIMITER + text for text in choices["text"]]
    return context, continuations, choices["label"].index(example["answerKey"])


# -- tokenisation -----------------------------------------------------------------------


def _prefix_token_id(tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer: Any, text: str, add_bos_token: bool | None, prefix_text: str | None) -> list[int]:
    # lm-eval HFLM.tok_encode: the tokenizer's default special tokens unless add_bos_token is
    # set, and none when the text already starts with the BOS (prefix) string.
    kwargs: dict[str, bool] = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
    if prefix_text is not None and text.startswith(prefix_text):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_bos_token: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids ``(context, continuation)`` exactly as lm-eval's ``TemplateLM._encode_pair`` (causal)."""
    if not context:
        raise LoraportError("empty context: the ARC prompt always has one")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    prefix_id = _prefix_token_id(tokenizer)
    prefix_text = tokenizer.decode(prefix_id) if prefix_id is not None else None
    whole = _tok_encode(tokenizer, context + continuation, add_bos_token, prefix_text)
    context_ids = _tok_encode(tokenizer, context, add_bos_token, prefix_text)
    return context_ids, whole[len(context_ids) :]


def model_max_length(model: Any, tokenizer: Any = None) -> int:
    """Context length as lm-eval resolves it: config (text_config first), tokenizer, then 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != _TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


# -- scoring ----------------------------------------------------------------------------


def _model_device(model: Any) -> torch.device | None:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return None


@torch.no_grad()
def loglikelihoods(
    model: Any,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 32,
    device: str = "cpu",
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = True,
) -> list[float]:
    """Summed log-probability of each continuation given its context (token ids), in request order.

    Requests run longest first in right-padded batches with an attention mask, so each
    row's positions are ``0..len-1`` as unbatched; ``inputs = (ctx + cont)[-(max_length+1):][:-1]``
    and the last ``len(cont)`` logits score ``cont`` (lm-eval's window).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise LoraportError(f"batch size must be >= 1, got {batch_size}")
    inputs: list[list[int]] = []
    for i, (context_ids, continuation_ids) in enumerate(requests):
        if not context_ids or not continuation_ids:
            raise LoraportError(f"request {i}: empty context or continuation after tokenisation")
        if len(continuation_ids) > max_length:
            raise LoraportError(
                f"request {i}: continuation of {len(continuation_ids)} tokens > max length {max_length}"
            )
        inputs.append((context_ids + continuation_ids)[-(max_length + 1) :][:-1])
    # Longest first (ties by tokens, as lm-eval's Collator): deterministic and little padding.
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]) - len(requests[i][1]), inputs[i]))
    scores: list[float] = [0.0] * len(requests)
    bar = tqdm(total=len(requests), desc="scoring choices", unit="req", file=sys.stderr, disable=not progress)
    keep_arg = _accepts_logits_to_keep(model)
    vocab = _vocab_size(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        # Only the continuation positions are scored: ask the head for the last `keep` positions,
        # and split the batch so that (rows x keep x vocab) logits stay within LOGIT_BUDGET (a
        # 262k vocabulary x 32 rows x 40 positions would be 1.3 GB of float32 logits).
        keep = max(len(inputs[i]) for i in chunk) - min(len(inputs[i]) - len(requests[i][1]) for i in chunk)
        rows_fit = max(1, LOGIT_BUDGET // max(1, keep * vocab)) if vocab else len(chunk)
        for sub_start in range(0, len(chunk), rows_fit):
            _score_batch(model, chunk[sub_start : sub_start + rows_fit], inputs, requests, scores, device, keep_arg)
        bar.update(len(chunk))
    bar.close()
    return scores


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (through a ``PeftModel`` wrapper too)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else 0


def _score_batch(
    model: Any,
    rows: list[int],
    inputs: list[list[int]],
    requests: list[tuple[list[int], list[int]]],
    scores: list[float],
    device: str,
    keep_arg: bool,
) -> None:
    """Score ``rows`` (request indices) in one right-padded forward pass; fills ``scores``."""
    width = max(len(inputs[i]) for i in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, i in enumerate(rows):
        ids[row, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        mask[row, : len(inputs[i])] = 1
    first = min(len(inputs[i]) - len(requests[i][1]) for i in rows)
    kwargs = {"logits_to_keep": width - first} if keep_arg else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
    offset = width - logits.shape[1]  # position of logits[:, 0]
    for row, i in enumerate(rows):
        length, continuation = len(inputs[i]), requests[i][1]
        # log-softmax of the continuation positions only: (len(cont), vocab), not (B, L, vocab).
        window = torch.log_softmax(logits[row, length - len(continuation) - offset : length - offset].float(), dim=-1)
        target = torch.tensor(continuation, dtype=torch.long, device=window.device)
        scores[i] = float(window.gather(1, target[:, None]).sum())


def choice_scores(
    model: Any,
    tokenizer: Any,
    examples: list[dict],
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    *,
    add_bos_token: bool | None = None,
) -> list[list[float]]:
    """Per question, the summed log-likelihood of each choice's continuation ``" " + text``."""
    pairs: list[tuple[list[int], list[int]]] = []
    sizes: list[int] = []
    for k, example in enumerate(examples):
        context, continuations, _ = arc_requests(validate_example(example, f"example {k}"))
        pairs.extend(encode_pair(tokenizer, context, c, add_bos_token) for c in continuations)
        sizes.append(len(continuations))
    flat = loglikelihoods(model, pairs, batch_size, device, model_max_length(model, tokenizer), progress)
    scores, start = [], 0
    for size in sizes:
        scores.append(flat[start : start + size])
        start += size
    return scores


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties, like np.argmax


def _mean_stderr(values: list[float]) -> float | None:
    # lm-eval's mean_stderr: sample standard deviation (n - 1) / sqrt(n).
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[dict],
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    *,
    add_bos_token: bool | None = None,
) -> EvalResult:
    """Score ARC records with an in-memory causal LM (``transformers`` model or ``PeftModel``).

    The model is moved to ``device`` and put in eval mode for the run (its training flag
    is restored after).
    """
    if not examples:
        raise LoraportError("no examples to evaluate")
    started = time.perf_counter()
    was_training = bool(getattr(model, "training", False))
    current = _model_device(model)
    if current is None or current != torch.device(device):
        model.to(device)
    model.eval()
    try:
        scores = choice_scores(model, tokenizer, examples, batch_size, device, progress, add_bos_token=add_bos_token)
    finally:
        model.train(was_training)
    acc, acc_norm = [], []
    for example, lls in zip(examples, scores, strict=True):
        gold = example["choices"]["label"].index(example["answerKey"])
        # lls are float32 sums; the division runs in float64, as numpy does in lm-eval.
        normalised = [ll / float(len(text)) for ll, text in zip(lls, example["choices"]["text"], strict=True)]
        acc.append(1.0 if _argmax(lls) == gold else 0.0)
        acc_norm.append(1.0 if _argmax(normalised) == gold else 0.0)
    n = len(examples)
    return EvalResult(
        acc=sum(acc) / n,
        acc_norm=sum(acc_norm) / n,
        n=n,
        acc_stderr=_mean_stderr(acc),
        acc_norm_stderr=_mean_stderr(acc_norm),
        seconds=time.perf_counter() - started,
    )


def open_model(model: Any) -> Any:
    """The model's lazy checkpoint: a local directory, a hub id in the local cache, or a ``.gguf`` file."""
    from .checkpoints import Checkpoint

    if isinstance(model, Checkpoint):
        return model
    path = Path(model)
    if path.is_dir() and not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
        raise CheckpointError(f"{path}: not a local model directory (expected config.json, weights, tokenizer)")
    return Checkpoint.open(model)


def load_model(
    model: str | os.PathLike[str] | Any,
    adapter: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """``AutoModelForCausalLM`` of a model directory, ``.gguf`` file or open checkpoint, plus an adapter if given."""
    checkpoint = open_model(model)
    lm = checkpoint.load_causal_lm(dtype)
    if adapter is None:
        return lm
    adapter_dir = Path(adapter)
    gguf_file = gguf_lora_file(adapter_dir)
    if gguf_file is not None:  # read (names and rows as transformers has them), then attached as PEFT
        with tempfile.TemporaryDirectory(prefix="loraport-gguf-lora-") as tmp:
            save_adapter(load_adapter(gguf_file, base=checkpoint), tmp)
            return _attach(lm, Path(tmp), gguf_file, model)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterError(f"{adapter_dir}: not a PEFT adapter directory (expected adapter_config.json) or GGUF LoRA")
    return _attach(lm, adapter_dir, adapter_dir, model)


def _attach(lm: Any, adapter_dir: Path, named: Path, model: Any) -> Any:
    """``PeftModel`` of ``lm`` with the PEFT adapter in ``adapter_dir`` (errors name the file the user gave)."""
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            # peft probes a deprecated transformers attribute; not the user's concern.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(lm, str(adapter_dir))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise AdapterError(f"{named}: cannot attach the adapter to {model}: {exc}") from None


def load_tokenizer(model: str | os.PathLike[str] | Any, add_bos_token: bool | None = None) -> Any:
    """The fast tokenizer saved with the model, or a GGUF file's (lm-eval passes ``add_bos_token`` when set)."""
    kwargs: dict[str, Any] = {"use_fast": True}
    if add_bos_token is not None:
        kwargs["add_bos_token"] = add_bos_token
    return open_model(model).load_tokenizer(**kwargs)


def evaluate_path(
    model: str,
    data: str,
    adapter: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    *,
    add_bos_token: bool | None = None,
) -> EvalResult:
    """Load model (+ adapter) and tokenizer (directories or a ``.gguf`` file) and score the ARC JSONL ``data``.

    ``seconds`` covers loading and scoring.
    """
    started = time.perf_counter()
    examples = load_arc_jsonl(data, limit)
    checkpoint = open_model(model)  # once for both (a GGUF header is scanned once)
    tokenizer = load_tokenizer(checkpoint, add_bos_token)
    lm = load_model(checkpoint, adapter, dtype)
    result = evaluate(lm, tokenizer, examples, batch_size, device, progress, add_bos_token=add_bos_token)
    result.seconds = time.perf_counter() - started
    return result
