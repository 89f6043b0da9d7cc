"""Real pretrained models: SmolLM2-135M LoRAs ported to its derivatives and to Gemma-3-270M.

    python benchmarks/real_assets.py --work benchmarks/work/real     # once: models, tasks, LoRAs, oracles
    python benchmarks/real.py --work benchmarks/work/real            # the ports: benchmarks/results/real.md

The source base and Gemma-3-270M are read straight from their GGUF files (the packages'
files: SmolLM2 Q4_1, Gemma-3 Q4_K_M, dequantized one tensor at a time); the SmolLM2
derivatives are the safetensors directories of ``real_assets.py``. For every target and task:
the target's base accuracy and its oracle's (the same LoRA recipe trained on the target, from
``assets.json``), then every method's port, each in a fresh process (wall time and peak RSS
of the port), scored with the evaluator (``loraport.evaluate``, lm-eval ``arc_challenge``
scoring) on the task's evaluation set; gain recovery = (ported - base) / (oracle - base).
``loraport inspect`` of each source LoRA against the source base closes the report. Rows are
cached by label in ``WORK/ports/rows-TARGET.json``, one file per target so that runs for
different targets can go on side by side (``--fresh`` to start over).
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

from calibrated import distill_cells, import_baseline_mb, port

# name -> transfer() options ("calibration": a key of the assets' calibration texts).
METHODS: dict[str, dict[str, Any]] = {
    "identity": {"method": "identity"},
    "project": {"method": "project", "subspace_rank": 64},
    "lorax": {"method": "lorax", "subspace_rank": 64},
    "procrustes": {"method": "procrustes", "subspace_rank": 64},
    "prolora": {"method": "prolora", "subspace_rank": 64},
    "auto": {"method": "auto"},
    "calibrated": {"method": "calibrated", "calibration": "generic"},
    "calibrated, domain text": {"method": "calibrated", "calibration": "domain"},
    # what was tried on Gemma-3: layers paired by relative depth instead of CKA
    "calibrated, domain text, relative depth": {
        "method": "calibrated",
        "calibration": "domain",
        "calib_depth": "relative",
    },
    # the demo's shipped LoRA (the facts LoRA cut to its top 4 directions per module, float16)
    "prolora, shipped rank-4 LoRA": {"method": "prolora", "subspace_rank": 64, "lora": "shipped"},
    "calibrated, domain text, shipped rank-4 LoRA": {
        "method": "calibrated",
        "calibration": "domain",
        "lora": "shipped",
    },
    # distillation from the task's inputs ("prompts": "train" = the task's training questions, no answers;
    # "seeds5" = its first five, with the teacher writing more)
    "distill": {"method": "distill", "prompts": "train"},
    "distill, prolora start": {"method": "distill", "prompts": "train", "init": "prolora"},
    "distill, KL only": {"method": "distill", "prompts": "train", "distill_loss": "kl"},
    "distill, sequence only": {"method": "distill", "prompts": "train", "distill_loss": "seq"},
    "distill, KL at all positions": {"method": "distill", "prompts": "train", "distill_positions": "all"},
    "distill, generic text kept": {"method": "distill", "prompts": "train", "calibration": "generic"},
    "distill, 5 seed prompts + 200 synthesized": {"method": "distill", "prompts": "seeds5", "synthesize": 200},
    "distill, 5 seed prompts + 200 synthesized by effect": {
        "method": "distill",
        "prompts": "seeds5",
        "synthesize": 200,
        "distill_synth_filter": "effect",
    },
    "distill, 5 seed prompts": {"method": "distill", "prompts": "seeds5"},
    # this round's speed and side-effect variants (benchmarks/results/real.md says which became defaults)
    "distill, bfloat16 weights": {"method": "distill", "prompts": "train", "distill_precision": "bfloat16"},
    "distill, mixed precision": {"method": "distill", "prompts": "train", "distill_precision": "mixed"},
    # The defaults at the end of 2026-12-07: bfloat16 weights on this CPU, the generic perplexity and the
    # keep term's head in pieces, the best checkpoint by agreement (then KL) rather than any record
    "distill, bfloat16 weights, best by agreement": {"method": "distill", "prompts": "train"},
    "distill, float32": {"method": "distill", "prompts": "train", "distill_precision": "float32"},
    "distill, lr 5e-3": {"method": "distill", "prompts": "train", "distill_lr": 5e-3},
    "distill, upper layers": {
        "method": "distill",
        "prompts": "train",
        "distill_layers": "upper",
        "distill_keep_bound": "off",
    },
    "distill, batch 32": {"method": "distill", "prompts": "train", "distill_batch_size": 32},
    "distill, keep weight 2": {"method": "distill", "prompts": "train", "distill_keep_weight": 2.0},
    "distill, token selection": {"method": "distill", "prompts": "train", "distill_tokens": "effect"},
    # The defaults of the night of 2026-12-07: "distill" options, --distill-layers auto (upper from a bare start,
    # so the same settings as "distill, upper layers" on Gemma-3: its adapter must come out byte for byte equal)
    # (the keep weight fixed: --distill-keep-bound came later)
    "distill, 2026-12-07 night defaults": {"method": "distill", "prompts": "train", "distill_keep_bound": "off"},
    "distill, 2026-12-07 night defaults, seed 1": {
        "method": "distill",
        "prompts": "train",
        "distill_seed": 1,
        "distill_keep_bound": "off",
    },
    "distill, 2026-12-07 night defaults, keep weight 1": {
        "method": "distill",
        "prompts": "train",
        "distill_keep_weight": 1.0,
        "distill_keep_bound": "off",
    },
    # The defaults since the side-effect bound: the keep weight doubles while the port's generic perplexity
    # change is over the adapter's own + 5 points (on these rows the bound is loose: nothing should change)
    "distill, keep bound": {"method": "distill", "prompts": "train", "distill_keep_bound": "adapter"},
    # the same, run before a loose bound was watched at every fifth check only (then: at every check)
    "distill, keep bound, every check": {"method": "distill", "prompts": "train", "distill_keep_bound": "adapter"},
    # the keep term over Gemma-3's whole vocabulary rather than the tokens both spell alike
    "distill, keep bound, whole vocabulary kept": {
        "method": "distill",
        "prompts": "train",
        "distill_keep_bound": "adapter",
        "distill_keep_vocab": "full",
    },
    # the defaults of 2026-12-08 with 8 held-out checks without progress before stopping (fusions of memorised
    # facts needed them: benchmarks/results/fusion_real.md)
    "distill, patience 8": {"method": "distill", "prompts": "train", "distill_patience": 8},
    # The same options as "distill", run with the defaults of 2026-12-07 (bfloat16 autocast on this
    # CPU, whole-answer teacher, the saturation stop); the "distill" rows keep the earlier defaults.
    "distill, 2026-12-07 defaults": {"method": "distill", "prompts": "train"},
}
COMMITTED = Path(__file__).parent / "results" / "real.json"  # rows and oracles of earlier runs
SEEDS = 5
SOURCE = "smollm2"


def load_assets(work: Path) -> dict[str, Any]:
    path = work / "assets.json"
    if not path.exists():
        raise SystemExit(f"{path} missing: run python benchmarks/real_assets.py --work {work} first")
    return json.loads(path.read_text())


def _stage(assets: dict[str, Any], name: str) -> dict[str, Any] | None:
    return assets["stages"].get(name)


def base_path(work: Path, assets: dict[str, Any], name: str) -> str:
    """A base as the benchmark reads it: the GGUF file for the packaged models, else the directory."""
    model = (_stage(assets, "models") or {}).get(name) if name in ("smollm2", "gemma3") else None
    if model is not None and model.get("gguf") and Path(model["gguf"]).exists():
        return str(model["gguf"])
    return str(work / "models" / name)


def scores(assets: dict[str, Any], target: str, task: str) -> tuple[float | None, float | None]:
    """The target's base and oracle accuracy on the task, from the assets' stage records."""
    oracle = _stage(assets, f"lora-{target}-{task}")
    base = _stage(assets, f"base-{target}-{task}")
    copied = _stage(assets, f"identity-{target}-{task}")  # records the target's base score too
    if base is not None:
        base_acc = base["score"]["acc"]
    else:
        base_acc = (oracle or copied or {}).get("base_score", {}).get("acc")
    oracle_acc = (oracle or {}).get("score", {}).get("acc")
    return base_acc, oracle_acc


def read_rows(ports: Path) -> dict[str, Any]:
    """Every cached row by label (``rows-TARGET.json``)."""
    cache: dict[str, Any] = {}
    for path in sorted(ports.glob("rows-*.json")):
        cache.update(json.loads(path.read_text()))
    return cache


def committed_rows() -> dict[str, Any]:
    """The rows of ``benchmarks/results/real.json`` by label: a new run adds to them rather than losing them."""
    if not COMMITTED.exists():
        return {}
    rows = json.loads(COMMITTED.read_text())["rows"]
    return {f"{r['task']}/{r['target']}/{r['name']}": r for r in rows}


def write_rows(ports: Path, target: str, cache: dict[str, Any]) -> None:
    """Write the target's cached rows to ``rows-TARGET.json`` (replaced in one step)."""
    import fcntl

    ports.mkdir(parents=True, exist_ok=True)
    path = ports / f"rows-{target}.json"
    with open(ports / f".rows-{target}.lock", "w") as lock:  # two runs on one target keep each other's rows
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text()) if path.exists() else {}
        rows.update({k: v for k, v in cache.items() if v["target"] == target})
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(path)


def copied_row(assets: dict[str, Any], target: str, task: str) -> dict[str, Any] | None:
    """The ``identity`` row from the assets' ``identity-TARGET-TASK`` stage (the LoRA loaded unchanged by PEFT)."""
    stage = _stage(assets, f"identity-{target}-{task}")
    if stage is None:
        return None
    acc, n = stage["score"]["acc"], stage["score"]["n"]
    return {"task": task, "target": target, "name": "identity", "options": METHODS["identity"], "acc": acc,
            "stderr": (acc * (1 - acc) / n) ** 0.5, "seconds": None, "peak_rss_mb": None, "error": None,
            "modules": None, "notes": ["identity rows of the derivatives: the source LoRA loaded unchanged "
                                       "(assets stage identity-TARGET-TASK; no port process to time)"]}  # fmt: skip


def prompt_file(work: Path, task: str, kind: str) -> Path:
    """The distillation inputs: the task's training questions (ARC JSONL; answers never read) or its first
    ``SEEDS`` (``seeds5``), written once under ``WORK/ports/seeds``."""
    train = work / "tasks" / task / "train.jsonl"
    if kind == "train":
        return train
    path = work / "ports" / "seeds" / f"{task}-{SEEDS}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [line for line in train.read_text(encoding="utf-8").splitlines() if line.strip()][:SEEDS]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def oracle_seconds(assets: dict[str, Any], target: str, task: str) -> float | None:
    """The oracle LoRA's training time on the target (same machine, from the assets; where this asset
    build has no oracle stage, the time results/real_assets.md records for it)."""
    stage = _stage(assets, f"lora-{target}-{task}")
    if stage is not None:
        return stage.get("train_seconds")
    recorded = COMMITTED.with_name("real_assets.md")
    for line in recorded.read_text(encoding="utf-8").splitlines() if recorded.exists() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[:2] == [task, target] and cells[7].isdigit():
            return float(cells[7])
    return None


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    from loraport.demo import TargetScorer
    from loraport.evaluate import load_arc_jsonl

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    assets = load_assets(work)
    cache: dict[str, Any] = {} if args.fresh else {**committed_rows(), **read_rows(work / "ports")}
    rows: list[dict[str, Any]] = []
    source = base_path(work, assets, SOURCE)
    for target in args.targets:
        target_base = base_path(work, assets, target)
        for task in args.tasks:
            adapter = work / "loras" / f"{SOURCE}-{task}"
            examples = load_arc_jsonl(work / "tasks" / task / "eval.jsonl")
            scorer: Any = None
            calibration = {
                "generic": work / "calibration" / "generic.txt",
                "domain": work / "calibration" / f"{task}.txt",
            }
            for name in args.methods:
                label = f"{task}/{target}/{name}"
                if label in cache:
                    rows.append(cache[label])
                    continue
                if name == "identity" and (row := copied_row(assets, target, task)) is not None:
                    rows.append(row)
                    continue
                if args.cached_only:
                    continue
                options = dict(METHODS[name])
                if "calibration" in options:
                    options["calibration"] = str(calibration[options["calibration"]])
                if "prompts" in options:
                    options["prompts"] = str(prompt_file(work, task, options["prompts"]))
                    if args.distill_time is not None:
                        options["distill_time"] = args.distill_time
                    options["distill_cache"] = str(
                        work / "ports" / ".distill" / label.replace("/", "-").replace(" ", "")
                    )
                lora = adapter
                if options.pop("lora", None) == "shipped":
                    if task != "facts":
                        continue  # the demo ships a facts LoRA only
                    from loraport.pretrained.demo import data_dir

                    lora = data_dir() / "facts-lora"
                out_dir = work / "ports" / task / target / name.replace(", ", "-").replace(" ", "-")
                kwargs = dict(adapter=str(lora), source_base=source, target_base=target_base, out=str(out_dir),
                              overwrite=True, progress=False, threads=args.threads,
                              cache_dir=str(work / "ports" / ".subspace-cache"), **options)  # fmt: skip
                measured = port(kwargs, isolated=True)
                row = {"task": task, "target": target, "name": name, "options": METHODS[name], "command": args.command,
                       "load": os.getloadavg()[0], **measured}  # fmt: skip
                row["acc"] = row["gain_recovery"] = row["stderr"] = None
                if measured["error"] is None:
                    if scorer is None:
                        scorer = TargetScorer(target_base, examples, batch_size=args.batch_size)
                    result = scorer.with_adapter(out_dir)
                    row["acc"], row["stderr"] = result.acc, result.acc_stderr
                    report = json.loads((out_dir / "loraport_report.json").read_text())
                    row["modules"] = report["totals"].get("output_modules")
                    row["notes"] = [n for n in report["notes"] if "mode" in n or n.startswith("WARNING")]
                    row["notes"] = [n for n in row["notes"] if not n.startswith("distill:")]
                cache[label] = row
                rows.append(row)
                write_rows(work / "ports", target, cache)
                acc = "-" if row["acc"] is None else f"{row['acc']:.3f}"
                print(f"[real] {label}: acc {acc} ({measured['seconds']:.1f} s)"
                      + (f" error: {measured['error']}" if measured["error"] else ""), flush=True)  # fmt: skip
    committed = committed_rows()
    for row in rows:  # base and oracle from the assets as they are now (cached rows may predate them)
        base, oracle = scores(assets, row["target"], row["task"])
        if oracle is None:  # an asset build without the oracle stage: the committed rows' oracle
            same = [r["oracle"] for r in committed.values() if (r["target"], r["task"]) == (row["target"], row["task"])]
            oracle = next((value for value in same if value is not None), None)
        row["base"], row["oracle"] = base if base is not None else row.get("base"), oracle
        if row["acc"] is None and "no adapter written" in (row.get("error") or "") and row["base"] is not None:
            # the no-harm rules wrote nothing: the user keeps the target as it is, which scores its base
            n = len(load_arc_jsonl(work / "tasks" / row["task"] / "eval.jsonl"))
            row["acc"], row["stderr"], row["modules"] = row["base"], (row["base"] * (1 - row["base"]) / n) ** 0.5, 0
            row["notes"] = [f"nothing written, scored as the base: {row['error']}"]
        gain = None if row["oracle"] is None or row["base"] is None else row["oracle"] - row["base"]
        ok = row["acc"] is not None and gain is not None and gain >= 0.05
        row["gain_recovery"] = (row["acc"] - row["base"]) / gain if ok else None
    inspection = inspect_sources(work, assets, args.tasks)
    return rows, {"assets": assets, "inspection": inspection}


def inspect_sources(work: Path, assets: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """``loraport inspect`` of each source LoRA against the source base (k = 64): energy and subspace share."""
    from loraport.structure import inspect_adapter

    out: dict[str, Any] = {}
    for task in tasks:
        rows = inspect_adapter(work / "loras" / f"{SOURCE}-{task}", base_path(work, assets, SOURCE), 64, "exact")

        def value(r: Any, field: str) -> float | None:
            if field.startswith("energy_top"):
                return r.energy_top[field.removeprefix("energy_top")]
            return getattr(r, field)

        def mean(field: str, rows: list[Any] = rows) -> float:
            values = [v for r in rows if (v := value(r, field)) is not None]
            return sum(values) / len(values) if values else float("nan")

        by_role: dict[str, list[Any]] = {}
        for r in rows:
            by_role.setdefault(r.module.rsplit(".", 1)[-1], []).append(r)
        out[task] = {
            "modules": len(rows),
            "energy_top1": mean("energy_top1"),
            "energy_top4": mean("energy_top4"),
            "energy_top16": mean("energy_top16"),
            "effective_rank": mean("effective_rank"),
            "in_base_subspace": mean("in_base_subspace"),
            "chance": mean("chance"),
            "by_role": {
                role: {field: mean(field, rs) for field in ("energy_top1", "energy_top4", "in_base_subspace", "chance")}
                for role, rs in sorted(by_role.items())
            },
        }
    return out


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(rows: list[dict[str, Any]], extra: dict[str, Any], command: str, seconds: float, baseline: float) -> str:
    assets = extra["assets"]
    config = assets["config"]
    loads = [r["load"] for r in rows if r.get("load") is not None] or [os.getloadavg()[0]]
    lines = [
        "# Real pretrained models: SmolLM2-135M LoRAs to its derivatives and to Gemma-3-270M",
        "",
        f"Produced by `{command}` ({seconds:.0f} s this run; rows cached) on {os.cpu_count()} shared cores, one torch "
        f"thread per port (two for the 2026-12-07 rows and after), load average {min(loads):.1f}-{max(loads):.1f}. "
        "Inputs from "
        "[real_assets.md](real_assets.md) (`benchmarks/real_assets.py`): the recipes, seeds, training times and "
        "drifts are there. Source: SmolLM2-135M-Instruct read from its GGUF file (Q4_1); targets: two SmolLM2 "
        "derivatives (continued full fine-tuning on Python sources, safetensors) and Gemma-3-270M read from its "
        "GGUF file (Q4_K_M; another family, tokenizer, widths, depth and GQA ratio). Oracle: the same LoRA recipe "
        "trained on the target. Each port runs in a fresh process (time = the `transfer()` call, peak RSS = that "
        f"process's; importing loraport and transformers alone peaks at {baseline:.0f} MB). Accuracy: "
        "`loraport.evaluate` (lm-eval `arc_challenge` scoring, `acc`), standard error about "
        "sqrt(p (1 - p) / n).",
        "",
    ]
    data = assets["stages"].get("data", {})
    for task, info in data.get("tasks", {}).items():
        lines.append(f"- `{task}` ({info['kind']}): {info['description']}; {info['n_eval']} evaluation questions.")
        source = assets["stages"].get(f"lora-{SOURCE}-{task}")
        if source:
            lines[-1] += (f" On the source: base {source['base_score']['acc']:.3f}, with its LoRA "
                          f"{source['score']['acc']:.3f}.")  # fmt: skip
    lines += ["", "| task | target | method | base | ported (s.e.) | oracle | gain recovery | modules | port time (s) "
              "| peak RSS (MB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        acc = f"{r['acc']:.3f} ({r['stderr']:.3f})" if r["acc"] is not None else f"n/a ({(r['error'] or '')[:70]})"
        lines.append(
            f"| {r['task']} | {r['target']} | {r['name']} | {_f(r['base'])} | {acc} | {_f(r['oracle'])} | "
            f"{_f(r['gain_recovery'], 2)} | {r.get('modules') or '-'} | {_f(r['seconds'], 1)} | "
            f"{_f(r['peak_rss_mb'], 0)} |"
        )
    lines += distill_table(rows, assets)
    lines += ["", "`auto` (the default method) is `identity` wherever shapes match (the derivatives) and `prolora` "
              "elsewhere (Gemma-3; `distill` when `--prompts` is given), so its rows would repeat those and it is "
              "not run."]  # fmt: skip
    if any(r["oracle"] is None for r in rows):
        lines[-1] += " An oracle of `-` was not trained (time on these machines); no gain recovery without one."
    commands = sorted({r["command"] for r in rows if r.get("command")})
    if commands:
        lines += ["", "The rows were computed (each once, then cached) by:", ""] + [f"- `{c}`" for c in commands]
    notes = sorted({n for r in rows for n in r.get("notes") or []})
    if notes:
        lines += ["", "Notes from the reports:", ""] + [f"- {n}" for n in notes]
    lines += ["", "## `loraport inspect` of the source LoRAs (against SmolLM2, k = 64)", "",
              "Share of each update's energy (squared singular values of `dW`) in its top 1 / 4 / 16 directions, "
              "effective rank, and the share of `dW` inside the base weight's top-64 singular subspaces next to "
              "what a random update of that shape would have (`chance`). Seed 003 claims a few directions carry "
              "over 90 % of the energy.", "",
              "| task | modules | top-1 | top-4 | top-16 | effective rank | in base top-64 | chance |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for task, i in extra["inspection"].items():
        lines.append(
            f"| {task} | {i['modules']} | {i['energy_top1']:.3f} | {i['energy_top4']:.3f} | {i['energy_top16']:.3f} | "
            f"{i['effective_rank']:.1f} | {i['in_base_subspace']:.3f} | {i['chance']:.3f} |"
        )
    lines += ["", "By projection (mean over layers):", "", "| task | projection | top-1 | top-4 | in base top-64 | "
              "chance |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for task, i in extra["inspection"].items():
        for role, v in i["by_role"].items():
            lines.append(
                f"| {task} | {role} | {v['energy_top1']:.3f} | {v['energy_top4']:.3f} | {v['in_base_subspace']:.3f} | "
                f"{v['chance']:.3f} |"
            )
    lines += ["", f"Recipes: `{json.dumps(config.get('recipes'))}`"]
    return "\n".join(lines) + "\n"


def distill_table(rows: list[dict[str, Any]], assets: dict[str, Any]) -> list[str]:
    """Distilled ports: held-out agreement, what was written, the cost elsewhere, time against the oracle's."""
    distilled = [r for r in rows if r.get("distill")]
    if not distilled:
        return []
    lines = ["", "### Distilled ports", "",
             "Held-out agreement: the share of the teacher's continuation tokens (on the held-out 10 % of the "
             "prompts) that the target predicts greedily, with the start port (`--init auto`: the copy on the "
             "derivatives, the bare target on Gemma-3; `prolora` in the prolora-start row) and with the distilled "
             "adapter; the written one is the better (no harm). Generic perplexity: the target's perplexity change"
             " on 32 standard-library docstring paragraphs with the written adapter. Time: the whole port "
             "(teacher, student, checks) against the oracle LoRA's training time on the same machine "
             "(`assets.json`). Every row takes the KL at the answer's positions (*sequence only*: no KL) but *KL at "
             "all positions*: the default before `--distill-positions auto`, which keeps it across tokenizers "
             "(Gemma-3) and takes all positions with one tokenizer (the derivatives, whose rows were not rerun).", "",
             "| task | target | variant | ported (s.e.) | gain recovery | held-out agreement start -> distilled | "
             "written | generic perplexity | steps (stopped) | teacher (s) | port time (s) | oracle training (s) | "
             "time / oracle | peak RSS (MB) |",
             "|---|---|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in distilled:
        oracle = oracle_seconds(assets, r["target"], r["task"])
        ratio = _f(r["seconds"] / oracle, 2) if oracle and r["seconds"] else "-"
        teacher = (r["distill"].get("teacher") or {}).get("seconds")
        lines.append(
            f"| {r['task']} | {r['target']} | {r['name']} | {_f(r['acc'])} ({_f(r['stderr'])}) | "
            f"{_f(r['gain_recovery'], 2)} | {distill_cells(r)} | {_f(teacher, 0)} | "
            f"{_f(r['seconds'], 0)} | {_f(oracle, 0)} | {ratio} | {_f(r['peak_rss_mb'], 0)} |"
        )
    for r in distilled:  # what a row's numbers need said beside them (set in the cached row by hand, dated)
        if r.get("footnote"):
            lines.append(f"\n`{r['task']}/{r['target']}/{r['name']}`: {r['footnote']}")
    synth = [r for r in distilled if r["distill"].get("synthesized")]
    for r in synth:
        s = r["distill"]["synthesized"]
        lines.append(
            f"\n`{r['task']}/{r['target']}/{r['name']}`: the writer wrote {s['written']} prompt(s) of the "
            f"{s['asked']} asked (rejected: {s['rejected']}), {s['kept']} kept."
        )
    return lines + phase_table(distilled)


# The report's phases, grouped for the table: (column, phases summed)
PHASE_GROUPS = (
    ("tokenizers", ("tokenizers",)),
    ("teacher", ("teacher: load", "teacher: generate", "teacher: score", "teacher: generic text")),
    ("student load", ("student: load", "student: targets")),
    ("keep targets, perplexity before", ("student: keep targets and perplexity before",)),
    ("training", ("student: train",)),
    ("checks after", ("student: held-out check", "student: perplexity after")),
)


def phase_table(distilled: list[dict[str, Any]]) -> list[str]:
    """Where each distilled port's time went (seconds per group of the report's phases) and where its peak RSS rose."""
    timed = [r for r in distilled if r["distill"].get("timings")]
    if not timed:
        return []
    lines = ["", "### Where the time and memory go", "",
             "Seconds per phase of the port (the report's `timings`; the teacher's phases read from the cache take "
             "none), training's steps per second, and the process's peak RSS at the end of the teacher, the "
             "student's load and training (MB).", "",
             "| task | target | variant | " + " | ".join(name for name, _ in PHASE_GROUPS)
             + " | steps/s | peak RSS: teacher / student load / training |",
             "|---|---|---|" + "---:|" * (len(PHASE_GROUPS) + 1) + "---|"]  # fmt: skip
    for r in timed:
        info = r["distill"]
        seconds = info["timings"]
        peaks = info.get("peak_rss_by_phase_mb") or {}
        cells = [_f(sum(seconds.get(p, 0.0) for p in phases), 0) for _, phases in PHASE_GROUPS]
        peak = " / ".join(_f(peaks.get(p), 0) for p in ("teacher: generic text", "student: load", "student: train"))
        lines.append(f"| {r['task']} | {r['target']} | {r['name']} | " + " | ".join(cells)
                     + f" | {_f(info.get('steps_per_second'), 3)} | {peak} |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="port SmolLM2-135M LoRAs to real targets, score every method")
    parser.add_argument("--work", default="benchmarks/work/real")
    parser.add_argument("--out", default="benchmarks/results/real.md")
    parser.add_argument("--targets", nargs="+", default=["Dsmall", "Dlarge", "gemma3"])
    parser.add_argument("--tasks", nargs="+", default=["facts", "bins"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--distill-time",
        type=float,
        default=None,
        help="a training-time limit (s) for the distill rows (default: the method's own stopping rule)",
    )
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--cached-only", action="store_true", help="port nothing: render the cached rows")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/real.py", *(argv or sys.argv[1:])])
    args.command = command
    started = time.perf_counter()
    rows, extra = run(args)
    text = render(rows, extra, command, time.perf_counter() - started, import_baseline_mb())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "inspection": extra["inspection"]}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
