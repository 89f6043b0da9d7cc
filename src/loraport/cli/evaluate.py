"""``loraport eval``: ARC-format multiple-choice scoring, as lm-eval."""

from __future__ import annotations

import argparse
import json

from . import register_command


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: directory (with its tokenizer) or .gguf file")
    p.add_argument("--adapter", default=None, help="LoRA adapter to apply: PEFT directory or GGUF LoRA file")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="ARC-format JSONL questions")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N questions")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="requests per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype (default float32)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _eval(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate import evaluate_path

    result = evaluate_path(
        args.model,
        args.data,
        adapter=args.adapter,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
        dtype=getattr(torch, args.dtype),
    )
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


register_command("eval", "score a model (+ adapter) on ARC-format multiple choice, as lm-eval", _eval_args, _eval)
