"""Calibrated transfer on the quality zoo: variants explored, and the benchmark rows.

    python benchmarks/calibrated.py --explore       # every variant, in-process (gain recovery only)
    python benchmarks/calibrated.py                 # the table: calibrated vs identity vs subspace methods,
                                                    # each port in a fresh process (time, peak RSS)

Writes ``benchmarks/results/calibrated.md`` (and ``.json``); exploration rows go to
``benchmarks/results/calibrated_exploration.md``. Rows are cached in
``benchmarks/work/calibrated/rows.json`` by label, so a re-run only adds what is missing
(``--fresh`` to start over).

Per row: target base accuracy, with the ported adapter, the oracle's (a LoRA trained on the
target), gain recovery = (ported - base) / (oracle - base), port time and peak RSS.
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

# name -> transfer() options. "calibration": "generic" (the zoo's calibration.txt) or "domain"
# (the task's training questions as prompts, without answers).
BASELINES: dict[str, dict[str, Any]] = {
    "identity": {"method": "identity"},
    "project-96": {"method": "project", "subspace_rank": 96},
    "project-full": {"method": "project", "subspace_rank": 128},
    "procrustes-96": {"method": "procrustes", "subspace_rank": 96},
    "prolora-64": {"method": "prolora", "subspace_rank": 64},
}
# Every calibrated variant spells out beta (calib_output_weight): the library's default is 1.
CAL = {"method": "calibrated", "calibration": "generic", "calib_output_weight": 0.0}
VARIANTS: dict[str, dict[str, Any]] = {
    # The prototype: match dW_s X_s, lam in {1, 10}, dW_0 = dW_s, plain truncation.
    "delta-svd-lam1": {**CAL, "ridge": 1.0, "calib_truncation": "svd"},
    "delta-svd-lam10": {**CAL, "ridge": 10.0, "calib_truncation": "svd"},
    # Reduced-rank ridge over a grid of lam.
    "delta-lam0.01": {**CAL, "ridge": 0.01},
    "delta-lam0.1": {**CAL, "ridge": 0.1},
    "delta-lam1": {**CAL, "ridge": 1.0},
    "delta-lam10": {**CAL, "ridge": 10.0},
    # Per-module ridge by 2-fold held-out calibration fit.
    "delta-auto": {**CAL, "ridge": "auto"},
    # Similarity-aware init: the init shrunk by its best scale on the calibration data.
    "delta-fitinit-lam1": {**CAL, "ridge": 1.0, "calib_init_scale": "fit"},
    # Other inits.
    "delta-init-prolora64-lam1": {**CAL, "ridge": 1.0, "init": "prolora", "subspace_rank": 64},
    "delta-init-project96-lam1": {**CAL, "ridge": 1.0, "init": "project", "subspace_rank": 96},
    "delta-init-zero-lam0.1": {**CAL, "ridge": 0.1, "init": "zero"},
    # Output matching: the module's whole output, (W_t + dW) X_t ~ (W_s + dW_s) X_s, i.e. the
    # target gains beta (W_s X_s - W_t X_t).
    "out-lam0.01": {**CAL, "ridge": 0.01, "calib_output_weight": 1.0},
    "out-lam0.1": {**CAL, "ridge": 0.1, "calib_output_weight": 1.0},
    "out-lam1": {**CAL, "ridge": 1.0, "calib_output_weight": 1.0},
    "out-svd-lam0.1": {**CAL, "ridge": 0.1, "calib_output_weight": 1.0, "calib_truncation": "svd"},
    "out-auto": {**CAL, "ridge": "auto", "calib_output_weight": 1.0},
    "out0.5-lam0.1": {**CAL, "ridge": 0.1, "calib_output_weight": 0.5},
    "out1.5-lam0.1": {**CAL, "ridge": 0.1, "calib_output_weight": 1.5},
    "out-fitinit-lam0.1": {**CAL, "ridge": 0.1, "calib_output_weight": 1.0, "calib_init_scale": "fit"},
    "out-init-zero-lam0.1": {**CAL, "ridge": 0.1, "calib_output_weight": 1.0, "init": "zero"},
    # More output rank than the source's r = 16 (a bigger adapter): room for the base correction.
    "out-lam0.1-rank32": {**CAL, "ridge": 0.1, "calib_output_weight": 1.0, "calib_rank": 32},
    "out-lam0.1-rank64": {**CAL, "ridge": 0.1, "calib_output_weight": 1.0, "calib_rank": 64},
    "out-lam0.01-rank32": {**CAL, "ridge": 0.01, "calib_output_weight": 1.0, "calib_rank": 32},
    # Calibration data: amount and domain.
    "out-lam0.1-n64": {**CAL, "ridge": 0.1, "calib_output_weight": 1.0, "calib_samples": 64},
    "out-lam0.1-n512": {**CAL, "ridge": 0.1, "calib_output_weight": 1.0, "calib_samples": 512},
    "delta-lam0.1-domain": {**CAL, "ridge": 0.1, "calibration": "domain"},
    "delta-lam0.01-domain": {**CAL, "ridge": 0.01, "calibration": "domain"},
    "out-lam0.1-domain": {**CAL, "ridge": 0.1, "calib_output_weight": 1.0, "calibration": "domain"},
    "out-lam0.01-domain": {**CAL, "ridge": 0.01, "calib_output_weight": 1.0, "calibration": "domain"},
    "out-lam0.1-rank32-domain": {
        **CAL,
        "ridge": 0.1,
        "calib_output_weight": 1.0,
        "calib_rank": 32,
        "calibration": "domain",
    },
    "out-lam0.01-rank32-domain": {
        **CAL,
        "ridge": 0.01,
        "calib_output_weight": 1.0,
        "calib_rank": 32,
        "calibration": "domain",
    },
}
# The table's rows: the library's defaults (nothing overridden but the text), and options.
TABLE: dict[str, dict[str, Any]] = {
    "calibrated": {"method": "calibrated", "calibration": "generic"},
    "calibrated, domain text": {"method": "calibrated", "calibration": "domain"},
    "calibrated --keep-all": {"method": "calibrated", "calibration": "generic", "no_harm": False},
    "calibrated --calib-rank 32": {"method": "calibrated", "calibration": "generic", "calib_rank": 32},
    "calibrated --calib-mode mapped": {"method": "calibrated", "calibration": "generic", "calib_mode": "mapped"},
    "calibrated --calib-mode mapped, domain text": {
        "method": "calibrated",
        "calibration": "domain",
        "calib_mode": "mapped",
    },
    # distillation from the task's training questions (no answers): ARC JSONL through the evaluator's template
    "distill": {"method": "distill", "prompts": "train"},
}
# What each part of the distillation loss adds (issue 18): run with --final and these names.
DISTILL_VARIANTS: dict[str, dict[str, Any]] = {
    # the default before --distill-positions auto (which takes all positions with the zoo's one tokenizer)
    "distill, KL at answer positions": {"method": "distill", "prompts": "train", "distill_positions": "answer"},
    "distill, KL only": {"method": "distill", "prompts": "train", "distill_loss": "kl", "distill_positions": "answer"},
    "distill, sequence only": {"method": "distill", "prompts": "train", "distill_loss": "seq"},
    "distill, KL at all positions": {"method": "distill", "prompts": "train", "distill_positions": "all"},
    "distill, no keep term": {
        "method": "distill",
        "prompts": "train",
        "distill_keep_weight": 0.0,
        "distill_positions": "answer",
    },
    # a second seed for the choice of positions, which the rows above were used to make
    "distill, seed 1": {"method": "distill", "prompts": "train", "distill_seed": 1},
    "distill, KL at answer positions, seed 1": {
        "method": "distill",
        "prompts": "train",
        "distill_positions": "answer",
        "distill_seed": 1,
    },
    "distill, keep weight 2": {
        "method": "distill",
        "prompts": "train",
        "distill_keep_weight": 2.0,
        "distill_positions": "answer",
    },
}
DEFAULT_TARGETS = ["D5", "D15", "D30", "I", "X"]


def domain_text(train_jsonl: Path, out: Path) -> Path:
    """The task's training questions as evaluation-format prompts, one per line, without answers."""
    lines = []
    for line in train_jsonl.read_text(encoding="utf-8").splitlines():
        if line.strip():
            lines.append(f"Question: {json.loads(line)['question']} Answer:")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def distill_summary(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a benchmark row keeps of a distilled port's report (no per-evaluation history)."""
    if not info or "heldout" not in info:
        return None
    student = info["student"]
    return {
        "chosen": info["chosen"],
        "heldout": info["heldout"],
        "perplexity_change": info["generic"]["perplexity_change"],
        "source_perplexity_change": info["generic"].get("source_perplexity_change"),
        "generic_text": info["generic"]["text"],
        "timings": info.get("timings"),
        "peak_rss_by_phase_mb": info.get("peak_rss_by_phase_mb"),
        "chat": info.get("chat"),
        "steps_per_second": student.get("steps_per_second"),
        "steps": student["steps"],
        "best_step": student["best_step"],
        "stopped": student["stopped"],
        "train_seconds": student["train_seconds"],
        "student_seconds": student.get("seconds"),
        "teacher": info.get("teacher"),
        "synthesized": info.get("synthesized"),
        "aligned_positions": student["aligned_positions"],
        "target_positions": student["target_positions"],
        "texts": [student["train_texts"], student["heldout_texts"]],
        "seconds": info.get("seconds"),
        "peak_rss_mb": info.get("peak_rss_mb"),
        "history": [{k: e[k] for k in ("step", "heldout_agreement", "heldout_kl", "probe_agreement")}
                    for e in student["history"]],
    }  # fmt: skip


def _port_child(queue: Any, kwargs: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(kwargs.pop("threads", 1))
    import transformers  # noqa: F401 - imported before the clock starts, as a long-running program would have

    from loraport import transfer
    from loraport.report import peak_rss_mb

    started = time.perf_counter()
    try:
        result = transfer(**kwargs)
        totals = result.report.totals()
        queue.put({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "error": None,
                   "mean_kept_energy": totals["mean_kept_energy"],
                   "calibration": result.report.calibration, "distill": distill_summary(result.report.distill),
                   "notes": result.report.notes})  # fmt: skip
    except Exception as exc:  # reported as a row
        queue.put({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "error": str(exc)})


def _baseline_child(queue: Any) -> None:
    import transformers  # noqa: F401

    import loraport.calibrate  # noqa: F401 - what every port imports
    from loraport.report import peak_rss_mb

    queue.put(peak_rss_mb())


def port(kwargs: dict[str, Any], isolated: bool) -> dict[str, Any]:
    """Run one transfer; ``isolated``: in a fresh spawned process, so its peak RSS is its own."""
    if not isolated:
        import torch

        from loraport import transfer

        torch.set_num_threads(kwargs.pop("threads", 1))
        started = time.perf_counter()
        try:
            result = transfer(**kwargs)
        except Exception as exc:
            return {"seconds": time.perf_counter() - started, "peak_rss_mb": None, "error": str(exc)}
        return {"seconds": time.perf_counter() - started, "peak_rss_mb": None, "error": None,
                "mean_kept_energy": result.report.totals()["mean_kept_energy"],
                "calibration": result.report.calibration, "distill": distill_summary(result.report.distill),
                "notes": result.report.notes}  # fmt: skip
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_port_child, args=(queue, kwargs))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def import_baseline_mb() -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_baseline_child, args=(queue,))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def run(args: argparse.Namespace, names: list[str], isolated: bool) -> list[dict[str, Any]]:
    import torch

    from loraport.demo import TargetScorer
    from loraport.evaluate import load_arc_jsonl
    from loraport.zoo import load_manifest

    torch.set_num_threads(args.threads)
    zoo = load_manifest(args.zoo)
    work = Path(args.work)
    cache_path = work / "rows.json"
    cache: dict[str, dict[str, Any]] = {}
    if cache_path.exists() and not args.fresh:
        cache = json.loads(cache_path.read_text())
    rows = []
    specs = {**BASELINES, **VARIANTS, **TABLE, **DISTILL_VARIANTS}
    for task in args.tasks or list(zoo.tasks):
        examples = load_arc_jsonl(zoo.eval_path(task), limit=args.limit)
        adapter = zoo.lora_path(zoo.source, task)
        source = zoo.model_path(zoo.source)
        calibration = {
            "generic": str(zoo.calibration_path),
            "domain": str(domain_text(zoo.path(zoo.tasks[task]["train"]), work / f"domain-{task}.txt")),
        }
        for target in args.targets or DEFAULT_TARGETS:
            scorer: Any = None
            base = zoo.base_accuracy(target, task)
            oracle = zoo.oracle_accuracy(target, task)
            for name in names:
                label = f"{task}/{target}/{name}" + ("/isolated" if isolated else "")
                if label in cache:
                    rows.append(cache[label])
                    continue
                if scorer is None:
                    scorer = TargetScorer(zoo.model_path(target), examples)
                    if args.limit:
                        base = scorer.base().acc
                        oracle = scorer.with_adapter(zoo.lora_path(target, task)).acc
                options = dict(specs[name])
                if "calibration" in options:
                    options["calibration"] = calibration[options["calibration"]]
                if "prompts" in options:
                    options["prompts"] = str(zoo.path(zoo.tasks[task]["train"]))
                    options["distill_cache"] = str(work / ".distill" / label.replace("/", "-").replace(" ", ""))
                out_dir = work / "adapters" / task / target / name
                kwargs = dict(adapter=str(adapter), source_base=str(source), target_base=str(zoo.model_path(target)),
                              out=str(out_dir), overwrite=True, progress=False, threads=args.threads,
                              cache_dir=str(work / ".subspace-cache"), svd="exact", **options)  # fmt: skip
                measured = port(kwargs, isolated)
                row = {"task": task, "target": target, "name": name, "options": specs[name], "base": base,
                       "oracle": oracle, "load": os.getloadavg()[0], **measured}  # fmt: skip
                if measured["error"] is None:
                    acc = scorer.with_adapter(out_dir).acc
                    row["acc"] = acc
                    gain = None if oracle is None or base is None else oracle - base
                    row["gain_recovery"] = (acc - base) / gain if gain and gain >= 0.05 else None
                else:
                    row["acc"] = row["gain_recovery"] = None
                cache[label] = row
                rows.append(row)
                work.mkdir(parents=True, exist_ok=True)
                cache_path.write_text(json.dumps(cache, indent=1))
                gr = "-" if row["gain_recovery"] is None else f"{row['gain_recovery']:.2f}"
                acc_text = "-" if row["acc"] is None else f"{row['acc']:.3f}"
                print(f"[calibrated] {label}: acc {acc_text} gain rec. {gr} ({measured['seconds']:.1f} s)"
                      + (f" error: {measured['error']}" if measured["error"] else ""), flush=True)  # fmt: skip
    return rows


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def exploration_table(rows: list[dict[str, Any]], names: list[str]) -> list[str]:
    order = {name: i for i, name in enumerate(DEFAULT_TARGETS)}
    cols = sorted({(r["task"], r["target"]) for r in rows}, key=lambda c: (c[0], order.get(c[1], 99)))
    by = {(r["task"], r["target"], r["name"]): r for r in rows}
    lines = ["| variant | " + " | ".join(f"{t} {g}" for t, g in cols) + " | mean (derivatives) |",
             "|---|" + "---:|" * (len(cols) + 1)]  # fmt: skip
    for name in names:
        cells, derived = [], []
        for task, target in cols:
            r = by.get((task, target, name))
            if r is None:
                cells.append("")
                continue
            if target == "I":
                cells.append("-" if r["acc"] is None else f"{r['acc'] - r['base']:+.3f} acc")
            else:
                cells.append(_f(r["gain_recovery"], 2))
                if r["gain_recovery"] is not None:
                    derived.append(r["gain_recovery"])
        mean = _f(sum(derived) / len(derived), 3) if derived else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def gain_cell(row: dict[str, Any]) -> str:
    """Gain recovery; on I (whose oracle is trained on I) the accuracy change against I's base too."""
    gain = _f(row["gain_recovery"], 2)
    if row["target"] == "I" and row["acc"] is not None:
        gain = f"{gain} (acc {row['acc'] - row['base']:+.3f})"
    return gain


def distill_cells(row: dict[str, Any]) -> str:
    """A distilled row's held-out agreement (start -> distilled), what was written, the perplexity change, steps."""
    d = row["distill"]
    held = d["heldout"]
    return (f"{held['start']['agreement']:.3f} -> {held['distilled']['agreement']:.3f} | {d['chosen']} | "
            f"{d['perplexity_change']:+.1%} | {d['steps']} ({d['stopped']})")  # fmt: skip


def final_table(rows: list[dict[str, Any]], baseline_mb: float) -> list[str]:
    lines = ["| task | target | method | base | ported | oracle | gain recovery | port time (s) | peak RSS (MB) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        cal = r.get("calibration") or {}
        name = r["name"]
        if cal:
            name += f" ({cal.get('samples')} samples, {cal.get('tokens')} tokens)"
        acc = _f(r["acc"]) if r["error"] is None else f"n/a ({r['error'][:60]})"
        lines.append(
            f"| {r['task']} | {r['target']} | {name} | {_f(r['base'])} | {acc} | {_f(r['oracle'])} | {gain_cell(r)} | "
            f"{_f(r['seconds'], 2)} | {_f(r['peak_rss_mb'], 0)} |"
        )
    lines += ["", f"Peak RSS is the porting process's own (`VmHWM`); a process that only imports loraport and "
              f"transformers peaks at {baseline_mb:.0f} MB. Gain recovery: `-` where the port failed; on I "
              "(whose oracle is trained on I) the accuracy change against I's base is given too."]  # fmt: skip
    return lines


def distill_table(rows: list[dict[str, Any]], zoo: Any) -> list[str]:
    """Distilled ports: held-out agreement, what was written, the cost elsewhere, time against the oracle's."""
    distilled = [r for r in rows if r.get("distill")]
    if not distilled:
        return []
    lines = ["", "## Distilled ports (`--method distill`)", "",
             "Prompts: the task's training questions through the evaluator's template, answers never read. "
             "Held-out agreement: the share of the teacher's continuation tokens on the held-out 10 % of the "
             "prompts that the target predicts greedily, with the start port (`--init auto`: the copy where "
             "shapes match, else the bare target) and with the distilled adapter; the written one is the better. "
             "Generic perplexity: the target's perplexity change on generic text with the written adapter. "
             "Oracle training: the zoo's own training time for the oracle LoRA (`manifest.json`, built on the "
             "same machine). The KL is taken at the answer's positions in every row but *KL at all positions* "
             "(*sequence only* has no KL); `--distill-positions auto`, the default since these rows, takes all "
             "positions with the zoo's single tokenizer, so *KL at all positions* is the default's row.", "",
             "| task | target | variant | base | ported | oracle | gain recovery | held-out agreement start -> "
             "distilled | written | generic perplexity | steps (stopped) | port time (s) | oracle training (s) |",
             "|---|---|---|---:|---:|---:|---:|---|---|---:|---|---:|---:|"]  # fmt: skip
    for r in distilled:
        lora = zoo.data["loras"].get(f"{r['target']}-{r['task']}") or {}
        lines.append(
            f"| {r['task']} | {r['target']} | {r['name']} | {_f(r['base'])} | {_f(r['acc'])} | {_f(r['oracle'])} | "
            f"{gain_cell(r)} | {distill_cells(r)} | {_f(r['seconds'], 1)} | {_f(lora.get('seconds'), 1)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="calibrated transfer on the quality zoo")
    parser.add_argument("--zoo", default="benchmarks/work/zoo")
    parser.add_argument("--work", default="benchmarks/work/calibrated")
    parser.add_argument("--out", default="benchmarks/results/calibrated.md")
    parser.add_argument("--explore", action="store_true", help="run every variant in-process (no memory column)")
    parser.add_argument("--variants", nargs="+", default=None, help="variant names (default: all, or the table's)")
    parser.add_argument("--final", nargs="+", default=["identity", "prolora-64", *TABLE], help="methods of the table")
    parser.add_argument("--targets", nargs="+", default=None)
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/calibrated.py", *(argv or sys.argv[1:])])
    started = time.perf_counter()
    if args.explore:
        names = args.variants or ["identity", *BASELINES, *VARIANTS]
        names = list(dict.fromkeys(names))
        rows = run(args, names, isolated=False)
        out = Path(args.out).with_name("calibrated_exploration.md")
        text = ["# Calibrated transfer: variants on the zoo", "",
                f"Produced by `{command}` ({time.perf_counter() - started:.0f} s this run). Derivatives: gain "
                "recovery = (ported - base) / (oracle - base); I (independent model): accuracy change vs its base "
                "(the adapter's task is not I's: any change is harm or noise).", "",
                *exploration_table(rows, names)]  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(text) + "\n", encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
        return 0
    from loraport.zoo import load_manifest

    rows = run(args, args.final, isolated=True)
    baseline = import_baseline_mb()
    loads = [r["load"] for r in rows if r.get("load") is not None] or [os.getloadavg()[0]]
    build = load_manifest(args.zoo).data["build"]
    title = "Calibrated transfer vs copying vs subspace methods on the zoo"
    if any(r.get("distill") for r in rows):
        title = "Distillation vs calibrated transfer vs copying on the zoo"
    text = [f"# {title}", "",
            f"The zoo: `{build['command']}` ({build['seconds']:.0f} s, {build['workers']} worker(s); its base and "
            "oracle scores are in the table: each build trains again and moves them).", "",
            f"Produced by `{command}` on {os.cpu_count()} shared cores, {args.threads} torch thread(s), load "
            f"average {min(loads):.1f}-{max(loads):.1f} while the rows were computed (rows are cached in "
            f"`{args.work}/rows.json`). Each port ran in a fresh process; time is the `transfer()` call "
            "(reading the text, both models' forward passes and the solves included), peak RSS the process's. "
            "The calibration text is the zoo's `calibration.txt` (generic sentences, no task data) unless the "
            "row says *domain text*: the task's training questions as prompts, without answers. Variants "
            "tried: [calibrated_exploration.md](calibrated_exploration.md); what they mean: "
            "[docs/methods.md](../../docs/methods.md#calibrated-transfer---method-calibrated-loraportcalibrate-loraportmethodscalibrated).",
            "", *final_table(rows, baseline), *distill_table(rows, load_manifest(args.zoo))]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
