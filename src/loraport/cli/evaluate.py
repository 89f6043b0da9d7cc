"""``loraport eval``: ARC-format multiple-choice scoring, as lm-eval; ``--generate``: generated answers, checked."""

from __future__ import annotations

import argparse
import json

from . import quiet_loading, register_command


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: directory (with its tokenizer) or .gguf file")
    p.add_argument("--adapter", default=None, help="LoRA adapter to apply: PEFT directory or GGUF LoRA file")
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE.jsonl",
        help="ARC-format JSONL questions; with --generate: JSONL with 'prompt' or 'messages' per line",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N lines")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="requests per forward pass (default 32; --generate: prompts per batch, default 16)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype (default float32)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    gen = p.add_argument_group("generation (--generate)")
    gen.add_argument("--generate", action="store_true", help="score generated answers (greedy) with a check")
    gen.add_argument("--check", default=None, metavar="KIND",
                     help="exact | contains | regex:PATTERN | json | json:KEY (see docs/formats.md)")  # fmt: skip
    gen.add_argument("--check-file", default=None, metavar="checks.py",
                     help="a Python file defining check(prompt, answer) -> bool (instead of --check)")  # fmt: skip
    gen.add_argument("--field", default="answer", help="the line's field exact / contains / json compare with")
    gen.add_argument("--chat", action="store_true", help="render 'prompt' lines through the chat template")
    gen.add_argument("--chat-template", default=None, metavar="FILE",
                     help="Jinja chat template for a model without one (implies --chat)")  # fmt: skip
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="T",
        help="longest answer in tokens (default 128); answers also end at the end of the turn",
    )
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="end an answer at this text (repeatable; '\\n' means a newline)")  # fmt: skip
    gen.add_argument("--answers", default=None, metavar="FILE.jsonl", help="write every answer here")


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _generation_only(args: argparse.Namespace) -> list[str]:
    given = {"--check": args.check, "--check-file": args.check_file, "--chat-template": args.chat_template,
             "--max-new-tokens": args.max_new_tokens, "--answers": args.answers}  # fmt: skip
    named = [flag for flag, value in given.items() if value is not None]
    return named + (["--chat"] if args.chat else []) + (["--stop"] if args.stop else [])


def _eval(args: argparse.Namespace) -> int:
    import torch

    from ..errors import LoraportError

    dtype = getattr(torch, args.dtype)
    if args.quiet:
        quiet_loading()
    if not args.generate:
        if _generation_only(args):
            raise LoraportError(f"{', '.join(_generation_only(args))} only apply with --generate")
        from ..evaluate import evaluate_path

        result = evaluate_path(
            args.model, args.data, adapter=args.adapter, limit=args.limit, batch_size=args.batch_size or 32,
            device=args.device, progress=not args.quiet, dtype=dtype,
        )  # fmt: skip
        print(json.dumps(result.to_dict()) if args.json else result.summary())
        return 0
    from ..generation import DEFAULT_MAX_NEW_TOKENS, evaluate_generation_path

    generated = evaluate_generation_path(
        args.model, args.data, args.adapter, check=args.check, field_name=args.field, check_file=args.check_file,
        chat=args.chat, chat_template=args.chat_template, max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        stops=[_unescape(s) for s in args.stop], limit=args.limit, batch_size=args.batch_size or 16,
        device=args.device, dtype=dtype, progress=not args.quiet, answers=args.answers,
    )  # fmt: skip
    print(json.dumps(generated.to_dict()) if args.json else generated.summary())
    if args.answers:
        print(f"answers written to {args.answers}")
    return 0


register_command(
    "eval",
    "score a model (+ adapter) on ARC-format multiple choice, as lm-eval, or its generated answers (--generate)",
    _eval_args,
    _eval,
)
