"""Build the real-model benchmark's inputs: ``python benchmarks/real_assets.py --work benchmarks/work/real``.

SmolLM2-135M-Instruct and Gemma-3-270M converted from their GGUF packages, two SmolLM2
derivatives by continued full fine-tuning on Python sources (3 % and 10 % projection drift),
the ``facts`` and ``bins`` tasks, calibration text, a LoRA per task on SmolLM2 and an oracle
LoRA per target and task, and the scores of all of them (see :mod:`loraport.pretrained.build`).
Cached stage by stage under ``--work``; rerunning does only what is missing. About 1-2 hours on
2 cores from scratch. ``--gguf-dir DIR`` takes the .gguf files from DIR instead of the installed
packages.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/real", help="asset directory (default benchmarks/work/real)")
    parser.add_argument("--gguf-dir", default=None, help="directory holding the .gguf files (default: the packages)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages (others must be cached)")
    parser.add_argument("--redo", nargs="*", default=[], help="rerun these stages even if cached")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per stage (default 2)")
    args = parser.parse_args(argv)

    from loraport.pretrained.build import RealConfig, build_assets

    config = RealConfig(threads=args.threads)
    path = build_assets(args.work, config, gguf_dir=args.gguf_dir, only=args.only, redo=args.redo)
    print(f"assets: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
