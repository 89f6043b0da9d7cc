"""Adapters of two bases fused into one adapter by distillation, judged by what the model writes.

``python benchmarks/fusion_generation.py`` fuses the generation benchmark's SmolLM2 ``json``
format LoRA and its Gemma-3 ``caps`` style LoRA (``benchmarks/generation_assets.py``) into one
LoRA on each target (``--targets gemma3 smollm2``) with ``loraport.fuse(method="distill")``,
each teacher on its own base and prompts, and scores each task's held-out behaviour rate on the
fused adapter, beside the target's base, each adapter on its own base, and the single distilled
ports of ``benchmarks/generation.py`` where that benchmark has them. Each fusion runs in its own
process (time and peak RSS are its own); rows are cached in ``WORK/fusion/rows.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = (("smollm2", "json"), ("gemma3", "caps"))  # (base, task): one format adapter, one style adapter
TEMPLATES = {"smollm2": None, "gemma3": "gemma"}  # the Gemma-3 GGUF base carries no chat template


def _fuse_child(queue: Any, kwargs: dict[str, Any], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401 - imported before the clock starts

    from loraport import fuse
    from loraport.report import peak_rss_mb

    started = time.perf_counter()
    try:
        result = fuse(**kwargs)
        queue.put({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "error": None,
                   "distill": result.report.distill, "notes": result.report.notes})  # fmt: skip
    except Exception as exc:  # reported as a row
        queue.put({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "error": str(exc)})


def fuse_isolated(kwargs: dict[str, Any], threads: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_fuse_child, args=(queue, kwargs, threads))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def fuse_kwargs(work: Path, real: Path, target: str, out: Path, seconds: float | None) -> dict[str, Any]:
    from loraport.distill import DistillOptions

    chat_teacher = next(base for base, task in TEACHERS if task != "json")
    options = DistillOptions(
        cache=str(work / "distill-cache"),  # shared with the single ports: a teacher they computed is reused
        source_chat_template=TEMPLATES[chat_teacher],
        target_chat_template=TEMPLATES[target],
        time=seconds,
    )
    return {
        "model_a": str(work / "loras" / f"{TEACHERS[0][0]}-{TEACHERS[0][1]}"),
        "model_b": str(work / "loras" / f"{TEACHERS[1][0]}-{TEACHERS[1][1]}"),
        "out": str(out),
        "method": "distill",
        "bases": [str(real / "models" / base) for base, _ in TEACHERS],
        "target_base": str(real / "models" / target),
        "prompts": [str(work / "tasks" / task / "prompts.jsonl") for _, task in TEACHERS],
        "distill": options,
        "overwrite": True,
        "progress": False,
    }


def score(work: Path, real: Path, target: str, adapter: Path, threads: int) -> dict[str, Any]:
    import torch

    from loraport.evaluate import load_model, load_tokenizer
    from loraport.pretrained.generation_build import GenerationConfig, generic_nll, score_generation

    torch.set_num_threads(threads)
    config = GenerationConfig(real=str(real))
    path = real / "models" / target
    tokenizer, model = load_tokenizer(path), load_model(path, adapter, torch.float32)
    scores = {task: score_generation(model, tokenizer, target, task, work, config, adapter / f"answers-{task}.jsonl")
              for _, task in TEACHERS}  # fmt: skip
    return {"tasks": scores, "generic_nll": generic_nll(model, tokenizer, config)}


def stage(work: Path, name: str) -> dict[str, Any]:
    return json.loads((work / "stages" / f"{name}.json").read_text())


def single_ports(work: Path) -> dict[str, Any]:
    """The generation benchmark's single distilled ports (default variant) by (target, task)."""
    path = work / "ports" / "rows.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    found: dict[tuple[str, str], Any] = {}
    for row in rows.values():
        if row["label"] == "distill" and not row.get("error"):
            found[(row["direction"].split("->")[1], row["task"])] = row
    return found


def kept(work: Path, row: dict[str, Any], target: str, base: str, task: str) -> float | None:
    """(fused - target base) / (adapter on its own base - that base's rate): the share of the gain the fusion keeps."""
    own = stage(work, f"lora-{base}-{task}")
    gain = own["score"]["rate"] - own["base_score"]["rate"]
    target_base = stage(work, f"lora-{target}-{task}")["base_score"]["rate"]
    return (row["score"]["tasks"][task]["rate"] - target_base) / gain if gain else None


def targets(work: Path, rows: dict[str, Any], singles: dict[tuple[str, str], Any]) -> list[str]:
    """Issue 28's targets per target base: >= 90% of each adapter's gain, fuse time <= the single distills' sum,
    generic perplexity change <= the worst single port's (a native adapter: its own change on its base)."""
    lines = ["", "## Targets", ""]
    for target, row in rows.items():
        if row.get("error"):
            lines.append(f"- {target}: the fusion failed ({row['error'][:120]})")
            continue
        shares, single_seconds, single_ppl, missing = [], 0.0, [], []
        for base, task in TEACHERS:
            shares.append((task, kept(work, row, target, base, task)))
            if base == target:
                single_ppl.append(stage(work, f"lora-{base}-{task}")["generic_perplexity_change"])
            elif (single := singles.get((target, task))) is not None:
                single_seconds += single["seconds"]
                single_ppl.append((single.get("distill") or {}).get("perplexity_change"))
            else:
                missing.append(task)
        cells = ", ".join(f"{task} {100 * k:.0f}%" if k is not None else f"{task} -" for task, k in shares)
        met = all(k is not None and k >= 0.9 for _, k in shares)
        lines.append(f"- {target}: kept {cells} (goal >= 90% each): {'met' if met else 'not met'}.")
        if missing:
            lines.append(f"- {target}: no single port of {', '.join(missing)} to compare the time and perplexity with.")
            continue
        change = (row.get("distill") or {}).get("generic", {}).get("perplexity_change")
        lines.append(f"- {target}: fuse time {row['seconds']:.0f} s against the single distilled ports' "
                     f"{single_seconds:.0f} s (their teachers came from the cache; goal: no more): "
                     f"{'met' if row['seconds'] <= single_seconds else 'not met'}.")  # fmt: skip
        if change is not None and all(v is not None for v in single_ppl):
            worst = max(single_ppl)
            lines.append(f"- {target}: generic perplexity change {change:+.1%} against the worst single port's "
                         f"{worst:+.1%} (goal: no more): {'met' if change <= worst else 'not met'}.")  # fmt: skip
    return lines


def markdown(work: Path, rows: dict[str, Any], command: str) -> str:
    singles = single_ports(work)
    lines = [
        "# Adapters of two bases fused into one by distillation (generation tasks)",
        "",
        f"Made by `{command}` (adapters: `python benchmarks/generation_assets.py`; single ports: "
        "`python benchmarks/generation.py`). 2 shared CPU cores; each fusion in its own process. The teachers: "
        f"{', '.join(f'the {task} LoRA on {base}' for base, task in TEACHERS)}, each on its own prompts "
        "(`tasks/TASK/prompts.jsonl`); the student: one LoRA on the target (`loraport.fuse(method='distill')`, "
        "default settings). Rate: the share of held-out prompts whose greedy answer passes the task's check. "
        "kept = (fused - target base) / (adapter on its own base - that base's rate), as a percentage.",
        "",
        "| target | task | target base | adapter on its own base (base) | single distilled port | fused | kept % "
        "| fuse time (s) | single ports' time (s) | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, row in rows.items():
        for base, task in TEACHERS:
            own = stage(work, f"lora-{base}-{task}")
            target_base = stage(work, f"lora-{target}-{task}")["base_score"]["rate"]
            single = singles.get((target, task))
            single_cell = "- (native)" if base == target else ("-" if single is None else
                                                               f"{single['score']['rate']:.3f}")  # fmt: skip
            single_time = "0 (native)" if base == target else ("-" if single is None else f"{single['seconds']:.0f}")
            if row.get("error"):
                fused_cell, kept_cell = f"error: {row['error'][:80]}", "-"
            else:
                result = row["score"]["tasks"][task]
                fused_cell = f"{result['rate']:.3f} ± {result['stderr'] or 0:.3f}"
                share = kept(work, row, target, base, task)
                kept_cell = "-" if share is None else f"{100 * share:.0f}"
            lines.append(
                f"| {target} | {task} | {target_base:.3f} | {own['score']['rate']:.3f} "
                f"({own['base_score']['rate']:.3f}) "
                f"| {single_cell} | {fused_cell} | {kept_cell} | {row['seconds']:.0f} | {single_time} | "
                f"{row.get('peak_rss_mb') or 0:.0f} |"
            )
    lines += ["", "Each fusion row was computed (then cached in `WORK/fusion/rows.json`) by:", ""]
    lines += [f"- {target}: `{row.get('command', '-')}`" for target, row in rows.items()]
    lines += targets(work, rows, singles)
    lines += ["", "## The fusions' reports", ""]
    for target, row in rows.items():
        distill = row.get("distill") or {}
        lines.append(f"- **{target}**: chosen {distill.get('chosen')}; stopped: "
                     f"{(distill.get('student') or {}).get('stopped')}; timings {distill.get('timings')}")  # fmt: skip
        for task in distill.get("tasks", []):
            start, end = task["start"]["agreement"], task["distilled"]["agreement"]
            lines.append(f"  - {task.get('task')}: held-out agreement {start:.3f} -> {end:.3f}")
        for note in row.get("notes", []):
            if note.startswith("WARNING") or "perplexity" in note:
                lines.append(f"  - {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/generation", help="the generation assets' directory")
    parser.add_argument("--real", default="benchmarks/work/real", help="the real benchmark's directory (models)")
    parser.add_argument("--targets", nargs="*", default=["gemma3", "smollm2"], choices=["gemma3", "smollm2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distill-time", type=float, default=None, help="the student's training-time limit (s)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument("--out", default="benchmarks/results/fusion_generation.md")
    args = parser.parse_args(argv)
    work, real = Path(args.work), Path(args.real)
    cache = work / "fusion" / "rows.json"
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/fusion_generation.py", *(argv or sys.argv[1:])])
    rows: dict[str, Any] = {} if args.fresh or not cache.exists() else json.loads(cache.read_text())
    for target in args.targets:
        if target in rows and not rows[target].get("error"):
            continue
        out = work / "fusion" / target
        print(f"[{time.strftime('%H:%M:%S')}] fuse onto {target} ...", flush=True)
        row = fuse_isolated(fuse_kwargs(work, real, target, out, args.distill_time), args.threads)
        if not row.get("error"):
            row["score"] = score(work, real, target, out, args.threads)
        row["command"] = command
        rows[target] = row
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rows, indent=1, default=str))
        print(f"    {row.get('score', {}).get('tasks')}, {row['seconds']:.0f} s, error {row.get('error')}", flush=True)
    Path(args.out).write_text(markdown(work, {t: rows[t] for t in args.targets if t in rows}, command))
    print(f"results: {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
