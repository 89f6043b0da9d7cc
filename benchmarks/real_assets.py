"""Build the real-model benchmark's inputs: ``python benchmarks/real_assets.py --work benchmarks/work/real``.

SmolLM2-135M-Instruct and Gemma-3-270M converted from their GGUF packages, two SmolLM2
derivatives by continued full fine-tuning on Python sources (3 % and 10 % projection drift),
the ``facts`` and ``bins`` tasks, calibration text, a LoRA per task on SmolLM2 and an oracle
LoRA per target and task, and the scores of all of them (see :mod:`loraport.pretrained.build`).
Cached stage by stage under ``--work``; rerunning does only what is missing. About 1-2 hours on
2 cores from scratch. ``--gguf-dir DIR`` takes the .gguf files from DIR instead of the installed
packages. Writes ``benchmarks/results/real_assets.md`` (``--results``) from ``assets.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

TITLES = {
    "smollm2": "SmolLM2-135M-Instruct (source)",
    "Dsmall": "SmolLM2 + Python, small drift",
    "Dlarge": "SmolLM2 + Python, larger drift",
    "gemma3": "Gemma-3-270M base",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/real", help="asset directory (default benchmarks/work/real)")
    parser.add_argument("--gguf-dir", default=None, help="directory holding the .gguf files (default: the packages)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages (others must be cached)")
    parser.add_argument("--redo", nargs="*", default=[], help="rerun these stages even if cached")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="stages run at once (default 2)")
    parser.add_argument("--results", default="benchmarks/results/real_assets.md", help="Markdown summary to write")
    args = parser.parse_args(argv)

    from loraport.io import atomic_write_text
    from loraport.pretrained.build import RealConfig, build_assets, stages

    config = RealConfig(threads=args.threads)
    path = build_assets(args.work, config, args.gguf_dir, args.only, args.redo, workers=args.workers)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/real_assets.py", *(argv or sys.argv[1:])])
    assets = json.loads(Path(path).read_text(encoding="utf-8"))
    tried = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(Path(args.work, "tried").glob("*.json"))}
    missing = [stage.name for stage in stages(config, args.gguf_dir) if stage.name not in assets["stages"]]
    atomic_write_text(args.results, assets_markdown(assets, command, tried, missing))
    print(f"assets: {path}\nsummary: {args.results}")
    return 0


def _score(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['acc']:.3f} / {entry['acc_norm']:.3f}"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _recipe(recipe: dict[str, Any]) -> str:
    return (
        f"r={recipe['r']}, alpha={recipe['alpha']}, dropout {recipe['dropout']}, {recipe['steps']} steps x batch "
        f"{recipe['batch_size']}, lr {recipe['lr']:g} (warm-up {recipe['warmup']}, cosine to 0), AdamW wd "
        f"{recipe['weight_decay']:g}, seven projections"
    )


def _derivative_row(name: str, d: dict[str, Any]) -> str:
    kinds = " / ".join(f"{d['drift'][k]:.3f}" for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"))  # fmt: skip
    note = f" ({d['note']})" if d.get("note") else ""
    return (
        f"| {name}{note} | {d['lr']:g} | {d['steps']} | {d['tokens_seen']:,} | {d['train_seconds']:.0f} | "
        f"{d['drift']['all']:.4f} | {kinds} | {d['heldout_loss']['generic']:.3f} | {d['heldout_loss']['python']:.3f} |"
    )


def assets_markdown(
    assets: dict[str, Any], command: str, tried: dict[str, Any] | None = None, missing: list[str] | None = None
) -> str:
    """The Markdown summary of ``assets.json``: models, derivatives, recipes, scores, stage times."""
    config, stages = assets["config"], assets["stages"]
    lines = [
        "# Real-model benchmark assets",
        "",
        "Built by `python benchmarks/real_assets.py --work benchmarks/work/real` (stages cached under the work "
        f"directory, each in its own process with {config['threads']} torch thread(s); summary written by "
        f"`{command}`). The machine is a 2-core one shared with other jobs (loaded during the build; the gemma3 "
        "bins oracle of this build ran beside one distill port): wall times are far above the work's own cost. "
        "`assets.json` in the work directory holds every number below.",
        "",
        "## Models",
        "",
    ]
    models = stages.get("models", {})
    lines += ["| name | what | model type | from | conversion (s) |", "|---|---|---|---|---:|"]
    for name in ("smollm2", "gemma3"):
        if name in models:
            entry = models[name]
            lines.append(
                f"| {name} | {TITLES[name]} | {entry['model_type']} | `{os.path.basename(entry['gguf'])}` "
                f"dequantized to {entry['dtype']} | {entry['seconds']:.0f} |"
            )
    derive = stages.get("derive")
    spec = config["derive"]
    if derive:
        lines += [
            "",
            f"Derivatives: SmolLM2 continued by full fine-tuning (every parameter) on Python standard-library "
            f"sources ({spec['train_chars']:,} characters, {derive['train_tokens_available']:,} tokens), one "
            f"phase per drift target ({', '.join(f'{k} {v:g}' for k, v in spec['targets'].items())}), each a fresh "
            f"AdamW (betas 0.9/0.98, lr in the table, {spec['warmup']} warm-up steps then constant, weight decay "
            f"{spec['weight_decay']:g}), batch {spec['batch_size']} x {spec['seq_len']} tokens, seed {spec['seed']} "
            f"(+ phase), at most {spec['max_steps']} steps a phase; a phase ends when the relative drift "
            f"`||W_D - W_S||_F / ||W_S||_F` over the seven projections (checked every {spec['check_every']} steps) "
            f"reaches its target, or at the step limit, and the model is saved. Held-out loss: next-token loss on "
            f"{config['heldout_lines']} /usr/share/doc paragraphs not in the calibration text (generic) and on "
            f"{spec['heldout_chars']:,} characters of standard-library files not trained on (python).",
            "",
            "| model | lr | steps | tokens seen | train time (s) | drift (all) | q / k / v / o / gate / up / down | "
            "held-out loss generic | held-out loss python |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        base = derive["source_heldout_loss"]
        lines.append(f"| smollm2 | - | 0 | 0 | 0 | 0 | - | {base['generic']:.3f} | {base['python']:.3f} |")
        lines += [_derivative_row(name, derive[name]) for name in spec["targets"] if name in derive]
        for label, record in (tried or {}).items():
            names = [name for name, value in record.items() if isinstance(value, dict) and "drift" in value]
            lines += [_derivative_row(f"{name}, tried: {label}", record[name]) for name in names]
        if tried:
            lines.append("")
            lines.append(
                "Rows marked *tried* come from an earlier run with the learning rates in their name (batch 2 x 128, "
                "3 warm-up steps): they reached the drift targets in tens of steps but raised the held-out loss by "
                "nats, even on the Python text they were trained on; they are not used (kept under `tried/`)."
            )
    data = stages.get("data", {})
    lines += ["", "## Tasks and calibration text", ""]
    for name, task in data.get("tasks", {}).items():
        lines.append(f"- `{name}` ({task['kind']}): {task['description']}. Files `{task['train']}`, `{task['eval']}`.")
    for calib in data.get("calibration", {}).values():
        lines.append(f"- calibration `{calib['path']}` ({calib['lines']} lines): {calib['what']}.")
    lines += ["", "## LoRA recipes (the same on the source and on every target: the oracles)", ""]
    for task, recipe in config["recipes"].items():
        lines.append(f"- `{task}`: {_recipe(recipe)}; seed {config['lora_seed']}; PEFT, loss on the answer tokens.")
    lines += [
        "",
        "## Scores",
        "",
        "`acc / acc_norm` with `loraport.evaluate` (lm-eval `arc_challenge` scoring), n = evaluation records "
        "(`facts`: the 200 training questions; `bins`: 160 held-out words). *identity* = the SmolLM2 LoRA "
        "copied unchanged onto the target (the simplest port; same shapes only).",
        "",
        "| task | model | n | base | + own LoRA (oracle) | + SmolLM2 LoRA (identity) | LoRA train acc | "
        "LoRA train (s) | eval (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task in config["recipes"]:
        for base in ("smollm2", *spec["targets"], "gemma3"):
            lora = stages.get(f"lora-{base}-{task}")
            identity = stages.get(f"identity-{base}-{task}")
            alone = stages.get(f"base-{base}-{task}")
            base_entry = alone["score"] if alone else (lora or identity or {}).get("base_score")
            if base_entry is None:
                continue
            n = base_entry["n"]
            train_acc = _number(lora.get("train_score", {}).get("acc") if lora else None, ".3f")
            train_s = _number(lora["train_seconds"] if lora else None, ".0f")
            eval_s = _number(lora["score"]["seconds"] if lora else None, ".0f")
            base_score, oracle = _score(base_entry), _score(lora and lora["score"])
            lines.append(
                f"| {task} | {base} | {n} | {base_score} | {oracle} | {_score(identity and identity['score'])} | "
                f"{train_acc} | {train_s} | {eval_s} |"
            )
    lines += ["", "## Stages", "", "| stage | wall (s) | peak RSS (MB) |", "|---|---:|---:|"]
    total = 0.0
    for name, record in stages.items():
        total += record["wall_seconds"]
        lines.append(f"| {name} | {record['wall_seconds']:.0f} | {record['peak_rss_mb']} |")
    lines.append(f"| total | {total:.0f} | |")
    if missing:
        lines += [
            "",
            f"Not built yet ({len(missing)} stage(s)): {', '.join(f'`{name}`' for name in missing)}. The same "
            "command builds only these (every finished stage is cached).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
