"""Generation adapters ported across families, both ways, judged by what the model writes.

    python benchmarks/real_assets.py --work benchmarks/work/real --only models     # the two models
    python benchmarks/generation_assets.py                                         # the six LoRAs
    python benchmarks/generation.py                     # the ports: benchmarks/results/generation.md

Three adapters (``json`` format, ``caps`` style, ``bullets`` instruction through the chat
template; :mod:`loraport.pretrained.generation_tasks`) were trained with the same data and recipe
on SmolLM2-135M-Instruct and on Gemma-3-270M. Each direction ports the source's adapter with
``--method distill`` from its training prompts (no answers) and scores the port by the share of
held-out prompts whose greedy answer passes the task's check (``loraport eval --generate``). The
target's own LoRA is the oracle. Every port runs in a fresh process (wall time and peak RSS
are its own); rows are cached by label in ``WORK/ports/rows.json`` (``--fresh`` starts over).

share = (ported - target base) / (source with adapter - source base): how much of the adapter's
behaviour the port carries; gain recovery = (ported - target base) / (oracle - target base).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from calibrated import port

DIRECTIONS = {"smollm2->gemma3": ("smollm2", "gemma3"), "gemma3->smollm2": ("gemma3", "smollm2")}
TASKS = ("json", "caps", "bullets")
TEMPLATES = {"smollm2": None, "gemma3": "gemma"}
TARGET_SHARE = 0.90  # the issue's goal: the port keeps this share of the adapter's gain on its own base
PPL_MARGIN = 0.05  # the issue's bound: the port's generic perplexity change <= the adapter's own + 5 points
# label -> transfer() options beside the defaults (the prompts and templates are the task's)
VARIANTS: dict[str, dict[str, Any]] = {
    "distill": {},
    "distill, 8 tokens to the first newline (the old default)": {"distill_max_new_tokens": 8, "distill_stop": "\\n"},
    "distill, 2 samples": {"distill_samples": 2},
    "distill, token selection": {"distill_tokens": "effect"},
    "distill, keep weight 1": {"distill_keep_weight": 1.0},
    "distill, keep weight 2": {"distill_keep_weight": 2.0},
    # the student's LoRA on the upper half of the layers, the keep weight fixed (as before --distill-keep-bound)
    "distill, upper layers": {"distill_layers": "upper", "distill_keep_bound": "off"},
    "distill, upper layers, keep weight 1": {
        "distill_layers": "upper",
        "distill_keep_weight": 1.0,
        "distill_keep_bound": "off",
    },
    # the same settings as "distill", run with the defaults of the evening of 2026-12-07 (bfloat16 weights, the
    # batch in parts, the best checkpoint by agreement); the other rows keep the defaults they ran with
    "distill, 2026-12-07 evening defaults": {},
    # the defaults since the side-effect bound (--distill-keep-bound adapter; the upper half by auto here)
    "distill, keep bound": {"distill_keep_bound": "adapter"},
    # every layer (where the fixed weight left the instruction port onto Gemma-3 at +46 %), with the bound
    "distill, every layer, keep bound": {"distill_layers": "all", "distill_keep_bound": "adapter"},
    # the keep term over Gemma-3's whole vocabulary rather than the 45.6k tokens both spell alike
    "distill, keep bound, whole vocabulary kept": {"distill_keep_bound": "adapter", "distill_keep_vocab": "full"},
    "distill, every layer, keep bound, whole vocabulary kept": {
        "distill_layers": "all",
        "distill_keep_bound": "adapter",
        "distill_keep_vocab": "full",
    },
}


def stage(work: Path, name: str) -> dict[str, Any]:
    path = work / "stages" / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path} missing: run python benchmarks/generation_assets.py --work {work} first")
    return json.loads(path.read_text())


def port_options(work: Path, real: Path, source: str, target: str, task: str, label: str,
                 out: Path, cache: Path, threads: int, time_limit: float | None) -> dict[str, Any]:  # fmt: skip
    options: dict[str, Any] = {
        "adapter": str(work / "loras" / f"{source}-{task}"),
        "source_base": str(real / "models" / source),
        "target_base": str(real / "models" / target),
        "out": str(out),
        "method": "distill",
        "prompts": str(work / "tasks" / task / "prompts.jsonl"),
        "distill_cache": str(cache),
        "progress": False,
        "overwrite": True,
        "threads": threads,
        **VARIANTS[label],
    }
    if TEMPLATES[source]:
        options["source_chat_template"] = TEMPLATES[source]
    if TEMPLATES[target]:
        options["target_chat_template"] = TEMPLATES[target]
    if task == "json":  # plain prompts: no template is read
        options.pop("source_chat_template", None)
        options.pop("target_chat_template", None)
    if time_limit is not None:
        options["distill_time"] = time_limit
    return options


def score_port(work: Path, real: Path, target: str, task: str, adapter: Path, threads: int) -> dict[str, Any]:
    import torch

    from loraport.evaluate import load_model, load_tokenizer
    from loraport.pretrained.generation_build import GenerationConfig, generic_nll, score_generation

    torch.set_num_threads(threads)
    config = GenerationConfig(real=str(real))
    path = real / "models" / target
    tokenizer, model = load_tokenizer(path), load_model(path, adapter, torch.float32)
    return score_generation(model, tokenizer, target, task, work, config, adapter / "answers.jsonl") | {
        "generic_nll": generic_nll(model, tokenizer, config)
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    work, real = Path(args.work), Path(args.real)
    cache_path = work / "ports" / "rows.json"
    rows: dict[str, Any] = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    for direction in args.directions:
        source, target = DIRECTIONS[direction]
        for task in args.tasks:
            for label in args.variants:
                key = f"{direction}|{task}|{label}"
                if (key in rows and not rows[key].get("error")) or args.cached_only:
                    continue
                out = work / "ports" / direction / task / label.replace(" ", "_").replace(",", "")
                options = port_options(work, real, source, target, task, label, out, work / "distill-cache",
                                       args.threads, args.distill_time)  # fmt: skip
                print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
                result = port(dict(options), isolated=True)
                row = {"direction": direction, "task": task, "label": label, "command": args.command, **result,
                       "options": {k: v for k, v in options.items() if k not in ("progress", "overwrite")}}  # fmt: skip
                if not result.get("error"):
                    row["score"] = score_port(work, real, target, task, out, args.threads)
                rows[key] = row
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                cache_path.write_text(json.dumps(rows, indent=1))
                rate = row.get("score", {}).get("rate")
                print(f"    rate {rate}, {result['seconds']:.0f} s, error {result.get('error')}", flush=True)
    return list(rows.values())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def share(work: Path, row: dict[str, Any]) -> float | None:
    """(ported - target base) / (source + adapter - source base): the share of the adapter's gain the port keeps."""
    source, target = DIRECTIONS[row["direction"]]
    src, tgt = stage(work, f"lora-{source}-{row['task']}"), stage(work, f"lora-{target}-{row['task']}")
    gain = src["score"]["rate"] - src["base_score"]["rate"]
    return (row["score"]["rate"] - tgt["base_score"]["rate"]) / gain if gain else None


def ppl_bound(work: Path, row: dict[str, Any]) -> float:
    """The largest generic perplexity change the port may make: the adapter's own on its source + 5 points."""
    source, _ = DIRECTIONS[row["direction"]]
    return max(stage(work, f"lora-{source}-{row['task']}")["generic_perplexity_change"], 0.0) + PPL_MARGIN


# The newest defaults first (the side-effect bound); on these targets (18 and 30 layers, a bare start)
# --distill-layers auto is the upper half, so "distill, upper layers" is the night of 2026-12-07's defaults;
# then the evening's, then the first.
DEFAULT_ROWS = ("distill, keep bound", "distill, upper layers", "distill, 2026-12-07 evening defaults", "distill")


def targets(work: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets for the newest defaults run on each (direction, task) (:data:`DEFAULT_ROWS`): share >=
    :data:`TARGET_SHARE`, and the port's generic perplexity change within the adapter's own + 5 points; a row not
    run says so."""
    lines = ["", "## Targets (the newest defaults run on each)", "",
             "| direction | task | variant | share >= 0.90 | perplexity within bound |",
             "|---|---|---|---|---|"]  # fmt: skip
    found = {(r["direction"], r["task"], r["label"]): r for r in rows if not r.get("error")}
    for direction in DIRECTIONS:
        for task in TASKS:
            row = next((found[(direction, task, label)] for label in DEFAULT_ROWS if (direction, task, label) in found),
                       None)  # fmt: skip
            if row is None:
                lines.append(f"| {direction} | {task} | - | not run | not run |")
                continue
            kept, bound = share(work, row), ppl_bound(work, row)
            change = (row.get("distill") or {}).get("perplexity_change")
            met = "-" if kept is None else f"{kept:.2f}: {'met' if kept >= TARGET_SHARE else 'not met'}"
            within = (
                "-" if change is None else f"{change:+.0%} vs {bound:+.0%}: {'met' if change <= bound else 'not met'}"
            )
            lines.append(f"| {direction} | {task} | {row['label']} | {met} | {within} |")
    return lines


def markdown(work: Path, rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Generation adapters ported across families, both ways",
        "",
        f"Made by `{command}` (models: `python benchmarks/real_assets.py --work benchmarks/work/real --only models`; "
        "adapters: `python benchmarks/generation_assets.py`). 2 shared CPU cores; each port in its own process.",
        "",
        "Rate = share of held-out prompts whose greedy answer (to the end of the turn, at most 96 tokens) passes the "
        "task's check. share = (ported - target base) / (source + adapter - source base); gain recovery = (ported - "
        "target base) / (oracle - target base). Generic perplexity: on 32 standard-library docstring paragraphs; "
        "*adapter* is the source adapter's own change on its source base, *port* the written port's change on the "
        "target.",
        "",
        "| direction | task | variant | target base | source + adapter (source base) | oracle | ported | share | gain "
        "recovery | generic perplexity adapter / port | teacher ended: end / stop / cap | time (s) | peak RSS (MB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r["direction"], TASKS.index(r["task"]), list(VARIANTS).index(r["label"]))):
        source, target = DIRECTIONS[row["direction"]]
        src = stage(work, f"lora-{source}-{row['task']}")
        tgt = stage(work, f"lora-{target}-{row['task']}")
        base, oracle = tgt["base_score"]["rate"], tgt["score"]["rate"]
        with_adapter, source_base = src["score"]["rate"], src["base_score"]["rate"]
        if row.get("error"):
            ported_cell, kept, recovery, port_ppl = f"error: {row['error'][:80]}", None, None, None
        else:
            score = row["score"]
            ported = score["rate"]
            ported_cell = f"{ported:.3f} ± {score['stderr'] or 0:.3f}"
            kept = share(work, row)
            recovery = (ported - base) / (oracle - base) if oracle != base else None
            port_ppl = (row.get("distill") or {}).get("perplexity_change")
        distill = row.get("distill") or {}
        ended = (distill.get("teacher") or {}).get("ended") or {}
        ended_cell = f"{ended.get('end', '-')} / {ended.get('stop', '-')} / {ended.get('length', '-')}"
        lines.append(
            f"| {row['direction']} | {row['task']} | {row['label']} | {base:.3f} | {with_adapter:.3f} "
            f"({source_base:.3f}) | {oracle:.3f} | {ported_cell} | {_f(kept, '.2f')} | {_f(recovery, '.2f')} | "
            f"{_pct(src['generic_perplexity_change'])} / {_pct(port_ppl)} | {ended_cell} | {row['seconds']:.0f} | "
            f"{_f(row.get('peak_rss_mb'), '.0f')} |"
        )
    lines += [f"\n`{r['direction']}/{r['task']}/{r['label']}`: {r['footnote']}" for r in rows if r.get("footnote")]
    lines += ["", "## Where each port's time went", "",
              "held-out agreement: the share of the teacher's answer tokens the target predicts greedily on the "
              "held-out 10 % of the prompts, bare target -> written port. *within bound*: the port's generic "
              "perplexity change is at most the adapter's own change on its source + 5 points.", "",
              "| direction | task | variant | held-out agreement | steps (stopped) | steps/s | teacher: generate / "
              "score / generic (s) | student: keep + perplexity before / train / checks (s) | within bound |",
              "|---|---|---|---|---|---:|---|---|---|"]  # fmt: skip
    for row in sorted(rows, key=lambda r: (r["direction"], TASKS.index(r["task"]), list(VARIANTS).index(r["label"]))):
        distill = row.get("distill") or {}
        if not distill:
            continue
        held = distill["heldout"]
        t = distill.get("timings") or {}
        checks = t.get("student: held-out check", 0) + t.get("student: perplexity after", 0)
        port_ppl = distill.get("perplexity_change")
        cached = "cached" in (distill.get("teacher") or {})
        teacher_cell = "from the cache (an earlier run's)" if cached else (
            f"{t.get('teacher: generate', 0):.0f} / {t.get('teacher: score', 0):.0f} / "
            f"{t.get('teacher: generic text', 0):.0f}"
        )  # fmt: skip
        bound = "-" if port_ppl is None else ("yes" if port_ppl <= ppl_bound(work, row) else "**no**")
        lines.append(
            f"| {row['direction']} | {row['task']} | {row['label']} | {held['start']['agreement']:.3f} -> "
            f"{held['distilled']['agreement']:.3f} ({distill['chosen']}) | {distill['steps']} ({distill['stopped']}) | "
            f"{_f(distill.get('steps_per_second'), '.3f')} | {teacher_cell} | "
            f"{t.get('student: keep targets and perplexity before', 0):.0f} / {t.get('student: train', 0):.0f} / "
            f"{checks:.0f} | {bound} |"
        )
    lines += targets(work, rows)
    commands = sorted({row["command"] for row in rows if row.get("command")})
    lines += ["", "The rows were computed (each once, then cached in `WORK/ports/rows.json`) by:", ""]
    lines += [f"- `{c}`" for c in commands]
    lines += ["", "## The adapters", "", "| base | task | base rate | with its LoRA | generic perplexity | train (s) |",
              "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for base in ("smollm2", "gemma3"):
        for task in TASKS:
            path = work / "stages" / f"lora-{base}-{task}.json"
            if path.exists():
                rec = json.loads(path.read_text())
                lines.append(f"| {base} | {task} | {rec['base_score']['rate']:.3f} | {rec['score']['rate']:.3f} | "
                             f"{_pct(rec['generic_perplexity_change'])} | {rec['train_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/generation", help="the generation assets' directory")
    parser.add_argument("--real", default="benchmarks/work/real", help="the real benchmark's directory (models)")
    parser.add_argument("--directions", nargs="*", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--variants", nargs="*", default=["distill"], choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads per port (default 2)")
    parser.add_argument("--distill-time", type=float, default=None, help="--distill-time for every port")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument("--cached-only", action="store_true", help="only render the cached rows")
    parser.add_argument("--out", default="benchmarks/results/generation.md", help="Markdown results")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/generation.py", *(argv or sys.argv[1:])])
    args.command = command
    rows = run(args)
    Path(args.out).write_text(markdown(Path(args.work), rows, command))
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"results: {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
