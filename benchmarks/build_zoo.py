"""Build the quality zoo (SPEC sec. 8): ``python benchmarks/build_zoo.py --out benchmarks/work/zoo [--quick]``.

Tiny pretrained LMs (S, its drifted derivatives D5/D15/D30, an independent I, a Gemma2 X of
other width and depth), two ARC-format tasks, a LoRA on S per task and an oracle LoRA per
target and task, calibration text, and ``manifest.json`` with every measured number.
About 10-15 minutes on 2 free cores; ``--quick`` is a seconds-long smoke build.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/work/zoo", help="zoo directory (default benchmarks/work/zoo)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and a few steps: a smoke test")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 2; quick: 1)")
    args = parser.parse_args(argv)

    from loraport.zoo import build_zoo, load_manifest

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/build_zoo.py", *(argv or sys.argv[1:])])
    path = build_zoo(args.out, quick=args.quick, workers=args.workers, command=command)
    zoo = load_manifest(Path(path).parent)
    print(summary(zoo.data))
    print(f"manifest: {path}")
    return 0


def summary(data: dict) -> str:
    """A plain-text digest of a manifest: models, drifts, losses, accuracies, build time."""
    lines = [f"built in {data['build']['seconds']:.0f} s ({data['build']['workers']} worker(s))", "", "models:"]
    for name, m in data["models"].items():
        drift = m.get("drift")
        drift_text = f"drift {drift['all']:.3f}" if drift else "drift n/a"
        lines.append(
            f"  {name:4s} {m['arch']:7s} {m['params']:>9,d} params  steps {m['steps']:5d}  "
            f"held-out loss {m['heldout_loss']:.3f}  {drift_text}"
        )
    lines.append("")
    lines.append("accuracy (base -> LoRA):")
    for key, lora in data["loras"].items():
        base = data["base_accuracy"][lora["base"]][lora["task"]]["acc"]
        lines.append(
            f"  {key:14s} {base:.3f} -> {lora['acc']:.3f}  ({lora['role']}, train acc {lora['train_acc']:.3f})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
