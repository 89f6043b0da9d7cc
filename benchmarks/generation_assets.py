"""Build the generation benchmark's adapters: ``python benchmarks/generation_assets.py``.

Three generation adapters (``json`` format, ``caps`` style, ``bullets`` instruction; see
:mod:`loraport.pretrained.generation_tasks`), each trained on SmolLM2-135M-Instruct and on
Gemma-3-270M with the same data and recipe (:mod:`loraport.pretrained.generation_build`), each
scored by ``eval --generate`` on held-out prompts. Needs the real benchmark's models first:
``python benchmarks/real_assets.py --work benchmarks/work/real --only models``. Stages are cached
under ``--work``; rerunning does only what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/generation", help="asset directory")
    parser.add_argument("--real", default="benchmarks/work/real", help="the real benchmark's work directory (models)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages")
    parser.add_argument("--redo", nargs="*", default=[], help="rerun these stages even if cached")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per stage (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="stages run at once (default 1)")
    args = parser.parse_args(argv)

    from loraport.pretrained.generation_build import GenerationConfig, build_generation_assets

    config = GenerationConfig(real=args.real, threads=args.threads)
    path = build_generation_assets(args.work, config, args.only, args.redo, workers=args.workers)
    stages = json.loads(Path(path).read_text())["stages"]
    for name, record in stages.items():
        if name.startswith("lora-"):
            print(f"{name}: base {record['base_score']['rate']:.3f} -> {record['score']['rate']:.3f}, generic "
                  f"perplexity {record['generic_perplexity_change']:+.1%}, {record['wall_seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
