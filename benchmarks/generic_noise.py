"""How much the generic-perplexity change depends on which lines of generic text measure it.

``--method distill`` reports a port's perplexity change on 32 standard-library docstring paragraphs and
compares it with the adapter's own change on its source (the same 32 paragraphs). This script measures
the same changes on every paragraph no port trains on (those 32, the 16 the side-effect bound watches
and the rest the standard library holds beyond the keep term's 128), with a standard error over
paragraphs (a bootstrap of the paired per-paragraph NLL differences), for the source adapters of the
generation benchmark and their ports written under ``WORK/ports``.

    python benchmarks/generic_noise.py --out benchmarks/results/generic_noise.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

COUNT = 32  # the distill default (--distill-generic-lines)
RESAMPLES = 2000


def paragraph_sets() -> dict[str, list[str]]:
    """The reported 32 paragraphs, the 16 watched ones, and every other one the keep term does not use."""
    from loraport.distill.generic import stdlib_paragraphs

    every = stdlib_paragraphs(10_000, 0)
    return {"reported": every[:COUNT], "watched": every[5 * COUNT : 5 * COUNT + COUNT // 2],
            "unused": every[5 * COUNT + COUNT // 2 :]}  # fmt: skip


def line_nlls(model: Any, tokenizer: Any, lines: list[str]) -> list[tuple[float, int]]:
    """Per paragraph: (summed next-token NLL, tokens scored), as the distill report takes them."""
    import torch

    from loraport.distill.generic import row_nlls, token_rows
    from loraport.distill.teaching import GENERIC_TOKENS

    return row_nlls(model, token_rows(tokenizer, lines, GENERIC_TOKENS), torch.device("cpu"))


def change(base: list[tuple[float, int]], other: list[tuple[float, int]], picks: list[int]) -> float:
    tokens = sum(base[i][1] for i in picks)
    return math.exp((sum(other[i][0] for i in picks) - sum(base[i][0] for i in picks)) / tokens) - 1


def summary(base: list[tuple[float, int]], other: list[tuple[float, int]], sets: dict[str, range]) -> dict[str, Any]:
    rng = random.Random(0)
    every = list(range(len(base)))
    boot = sorted(change(base, other, [rng.choice(every) for _ in every]) for _ in range(RESAMPLES))
    mean = sum(boot) / len(boot)
    return {
        **{name: change(base, other, list(picks)) for name, picks in sets.items()},
        "all": change(base, other, every),
        "se": (sum((b - mean) ** 2 for b in boot) / (len(boot) - 1)) ** 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/generation")
    parser.add_argument("--real", default="benchmarks/work/real")
    parser.add_argument("--out", default="benchmarks/results/generic_noise.md")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from loraport.evaluate import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work, real = Path(args.work), Path(args.real)
    texts = paragraph_sets()
    lines = texts["reported"] + texts["watched"] + texts["unused"]
    bounds = {"reported": range(0, COUNT), "watched": range(COUNT, COUNT + len(texts["watched"]))}
    cases = {  # base -> [(what, adapter directory)]
        "smollm2": [(f"the {t} adapter on its own base", work / "loras" / f"smollm2-{t}") for t in ("caps", "bullets")],
        "gemma3": [
            (f"{t} port: {d.name.replace('_', ' ')}", d)
            for t in ("caps", "bullets")
            for d in sorted((work / "ports" / "smollm2->gemma3" / t).iterdir())
            if (d / "adapter_config.json").exists()
        ],
    }
    rows = []
    for base, adapters in cases.items():
        path = real / "models" / base
        tokenizer = load_tokenizer(path)
        base_nlls = line_nlls(load_model(path, None, torch.float32), tokenizer, lines)
        assert len(base_nlls) == len(lines), "a paragraph of one token: the sets' index ranges would shift"
        for what, adapter in adapters:
            nlls = line_nlls(load_model(path, adapter, torch.float32), tokenizer, lines)
            rows.append({"base": base, "what": what, **summary(base_nlls, nlls, bounds)})
            print(json.dumps(rows[-1]), flush=True)
    lines_md = [
        "# Generic perplexity change: how much the lines decide it",
        "",
        f"Made by `python benchmarks/generic_noise.py --out {args.out}` ({time.perf_counter() - started:.0f} s, "
        f"{args.threads} threads). Paragraphs of the standard library's module docstrings (seed 0) no port trains "
        f"on: the {COUNT} every distill report measures (*reported*), the {len(texts['watched'])} the side-effect "
        f"bound watches (*watched*), and all {len(lines)} (those and the {len(texts['unused'])} the keep term's "
        "128 leave over); s.e.: bootstrap over the paragraphs of all of them.",
        "",
        "| base | adapter | reported (32) | watched (16) | all | s.e. (all) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines_md.append(f"| {r['base']} | {r['what']} | {r['reported']:+.1%} | {r['watched']:+.1%} | {r['all']:+.1%} "
                        f"| {r['se']:.1%} |")  # fmt: skip
    Path(args.out).write_text("\n".join(lines_md) + "\n", encoding="utf-8")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
