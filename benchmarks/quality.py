"""Quality benchmark (SPEC sec. 8): every target x method x subspace rank x task, scored with the ARC evaluator.

    python benchmarks/build_zoo.py --out benchmarks/work/zoo          # once, ~15 min
    python benchmarks/quality.py --zoo benchmarks/work/zoo            # writes benchmarks/results/quality.md
    python benchmarks/quality.py --quick                              # smoke test: one target, few methods

Per row: target base accuracy, accuracy with the transferred adapter, the oracle's (a LoRA
trained on the target with the source's recipe), gain recovery = (transferred - base) /
(oracle - base), mean subspace similarity, mean kept energy ||dW_t|| / ||dW_s||, modules
skipped, transfer time. ``identity`` only where shapes match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

FULL = 1_000_000  # "full" subspace rank: clamped to min(m, n) per module
METHODS = ["identity", "project", "lorax", "procrustes", "prolora"]


def parse_ranks(text: str) -> list[int]:
    return [FULL if item.strip() == "full" else int(item) for item in text.split(",") if item.strip()]


def rank_label(k: int | None) -> str:
    return "-" if k is None else ("full" if k >= FULL else str(k))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from loraport.demo import PortScore, TargetScorer, port_and_score
    from loraport.evaluate import load_arc_jsonl
    from loraport.zoo import load_manifest

    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()
    zoo = load_manifest(args.zoo)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks or list(zoo.tasks)
    targets = args.targets or zoo.targets
    rows: list[dict[str, Any]] = []
    for task in tasks:
        examples = load_arc_jsonl(zoo.eval_path(task), limit=args.limit)
        adapter = zoo.lora_path(zoo.source, task)
        source = zoo.model_path(zoo.source)
        scorer = TargetScorer(source, examples)
        own = scorer.with_adapter(adapter)
        base = scorer.base()
        rows.append({**PortScore(zoo.source, "base", acc=base.acc, acc_norm=base.acc_norm, n=base.n).to_dict(),
                     "task": task})  # fmt: skip
        rows.append({**PortScore(zoo.source, "source+adapter", acc=own.acc, acc_norm=own.acc_norm, n=own.n).to_dict(),
                     "task": task})  # fmt: skip
        for target in targets:
            scorer = TargetScorer(zoo.model_path(target), examples)
            base = scorer.base()
            oracle = None if args.limit else zoo.oracle_accuracy(target, task)
            if args.limit:  # a subset: the manifest's oracle accuracy is for the whole set
                oracle = scorer.with_adapter(zoo.lora_path(target, task)).acc
            rows.append({**PortScore(target, "base", acc=base.acc, acc_norm=base.acc_norm, n=base.n).to_dict(),
                         "task": task})  # fmt: skip
            rows.append({**PortScore(target, "oracle", acc=oracle, n=base.n).to_dict(), "task": task})
            for method in args.methods:
                for k in [None] if method == "identity" else args.ranks:
                    label = f"{task}/{target}/{method}" + ("" if k is None else f"-k{rank_label(k)}")
                    row = port_and_score(
                        adapter,
                        source,
                        target,
                        scorer,
                        method,
                        k or 64,
                        work / label,
                        base_acc=base.acc,
                        oracle_acc=oracle,
                        svd=args.svd,
                        cache_dir=work / ".subspace-cache",
                    )
                    rows.append({**row.to_dict(), "task": task})
                    acc = "n/a" if row.acc is None else f"{row.acc:.3f}"
                    print(f"[quality] {label}: acc {acc} (base {base.acc:.3f}, oracle {oracle})", flush=True)
    return {"rows": rows, "tasks": tasks, "targets": targets}


# -- report -------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def zoo_summary(data: dict[str, Any]) -> list[str]:
    lines = ["## The zoo", ""]
    build = data["build"]
    lines.append(
        f"Built by `{build.get('command') or 'build_zoo'}` in {build['seconds']:.0f} s "
        f"({build['workers']} worker process(es) x {build['threads_per_worker']} thread, {build['cpu_count']} cores; "
        f"torch {build['versions']['torch']}, transformers {build['versions']['transformers']}, "
        f"peft {build['versions']['peft']})."
    )
    lines += ["", "| model | arch | params | hidden x layers (heads/kv) | steps | held-out loss | drift vs S (all) | "
              "q / k / v / o / gate / up / down drift |", "|---|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, m in data["models"].items():
        s = m["shape"]
        drift = m.get("drift")
        per = " / ".join(f"{drift[k]:.3f}" for k in kinds) if drift else "-"
        origin = f"{m['parent']} + shifted corpus" if m.get("parent") else "pretrained"
        lines.append(
            f"| {name} | {m['arch']} ({origin}) | {m['params']:,} | {s['hidden']} x {s['layers']} "
            f"({s['heads']}/{s['kv_heads']}) | {m['steps']} | {m['heldout_loss']:.3f} | "
            f"{_f(drift['all']) if drift else '-'} | {per} |"
        )
    lines += ["", "Tasks:", ""]
    for name, t in data["tasks"].items():
        lines.append(f"- `{name}` ({t['kind']}): {t['description']}; {t['n_train']} train / {t['n_eval']} eval.")
    lines += ["", "Accuracy (the evaluator's `acc`) of each base and of each LoRA trained on it (same recipe for all "
              "bases; on S it is the adapter being ported, on the targets it is the oracle):", ""]  # fmt: skip
    tasks = list(data["tasks"])
    lines.append("| model | " + " | ".join(f"{t}: base | {t}: LoRA" for t in tasks) + " |")
    lines.append("|---|" + "---:|---:|" * len(tasks))
    for name in data["models"]:
        cells = []
        for t in tasks:
            base = data["base_accuracy"].get(name, {}).get(t, {}).get("acc")
            lora = data["loras"].get(f"{name}-{t}", {}).get("acc")
            cells += [_f(base), _f(lora)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def headline(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    lines = ["## Headline", ""]
    lines.append(
        "Best port per target and task (highest `acc`; ties to the cheaper method), next to `identity` "
        "(copying the factors) and the best pure subspace method (`project` / `lorax` / `procrustes`)."
    )
    lines.append("")
    for task in result["tasks"]:
        own = next(r for r in rows if r["task"] == task and r["method"] == "source+adapter")
        base = next(r for r in rows if r["task"] == task and r["target"] == own["target"] and r["method"] == "base")
        lines.append(f"- `{task}`: source {own['target']} base {_f(base['acc'])}, with the adapter {_f(own['acc'])}.")
    lines += ["", "| task | target | base | oracle | best method (k) | acc | gain recovery | "
              "identity acc (gain rec.) | best subspace method (k): acc (gain rec.) |",
              "|---|---|---:|---:|---|---:|---:|---|---|"]  # fmt: skip
    for task in result["tasks"]:
        for target in result["targets"]:
            ports = [r for r in rows if r["task"] == task and r["target"] == target and r["acc"] is not None
                     and r["method"] in METHODS]  # fmt: skip
            if not ports:
                continue
            base = next(r["acc"] for r in rows if r["task"] == task and r["target"] == target and r["method"] == "base")
            oracle = next(r["acc"] for r in rows if r["task"] == task and r["target"] == target
                          and r["method"] == "oracle")  # fmt: skip
            best = max(ports, key=lambda r: (r["acc"], -METHODS.index(r["method"]), -(r["k"] or 0)))
            ident = next((r for r in ports if r["method"] == "identity"), None)
            subspace = [r for r in ports if r["method"] in ("project", "lorax", "procrustes")]
            sub = max(subspace, key=lambda r: (r["acc"], -(r["k"] or 0))) if subspace else None
            ident_text = f"{_f(ident['acc'])} ({_f(ident['gain_recovery'], 2)})" if ident else "n/a (shapes differ)"
            sub_text = (f"{sub['method']} ({rank_label(sub['k'])}): {_f(sub['acc'])} ({_f(sub['gain_recovery'], 2)})"
                        if sub else "-")  # fmt: skip
            best_name = best["method"] + ("" if best["k"] is None else f" ({rank_label(best['k'])})")
            lines.append(
                f"| {task} | {target} | {_f(base)} | {_f(oracle)} | {best_name} | "
                f"{_f(best['acc'])} | {_f(best['gain_recovery'], 2)} | {ident_text} | {sub_text} |"
            )
    lines += ["", "Mean kept energy `||dW_t|| / ||dW_s||` by method and k (over targets and tasks):", ""]
    ranks = sorted({r["k"] for r in rows if r["method"] in METHODS and r["k"] is not None})
    lines.append("| method | " + " | ".join(f"k={rank_label(k)}" for k in ranks) + " |")
    lines.append("|---|" + "---:|" * len(ranks))
    for method in METHODS[1:]:
        cells = []
        for k in ranks:
            kept = [r["mean_kept_energy"] for r in rows if r["method"] == method and r["k"] == k
                    and r["mean_kept_energy"] is not None]  # fmt: skip
            cells.append(_f(sum(kept) / len(kept)) if kept else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def observations(result: dict[str, Any], zoo_data: dict[str, Any]) -> list[str]:
    """Plain statements read off the numbers (so a re-run rewrites them honestly)."""
    rows = result["rows"]
    ports = [r for r in rows if r["method"] in METHODS and r["acc"] is not None]
    if not ports:
        return []
    models, source = zoo_data["models"], zoo_data["source"]
    n = max(r["n"] for r in ports)
    noise = 2 * math.sqrt(0.25 / n)  # two standard errors of an accuracy near 0.5
    related = [t for t in result["targets"] if models[t].get("parent") == source]
    unrelated = [t for t in result["targets"] if t not in related]

    def pick(task: str, target: str, method: str | None = None) -> list[dict[str, Any]]:
        return [r for r in ports if r["task"] == task and r["target"] == target and method in (None, r["method"])]

    def base_of(task: str, target: str) -> float:
        return next(r["acc"] for r in rows if r["task"] == task and r["target"] == target and r["method"] == "base")

    def name(r: dict[str, Any]) -> str:
        return r["method"] + ("" if r["k"] is None else f" (k={rank_label(r['k'])})")

    out = [f"Observations (generated from the rows below; accuracy differences under about {noise:.2f}, two "
           f"standard errors at n = {n}, are noise):", ""]  # fmt: skip
    for task in result["tasks"]:
        if related:
            ident = {t: next(iter(pick(task, t, "identity")), None) for t in related}
            parts = [
                f"{t} ({models[t]['drift']['all']:.1%} drift) {_f(ident[t]['gain_recovery'], 2)}"
                for t in related
                if ident[t] is not None
            ]
            out.append(f"- `{task}`, derivatives of {source}: copying the factors (`identity`) recovers "
                       f"{', '.join(parts)} of the oracle's gain.")  # fmt: skip
            better, versus = [], []
            for t in related:
                others = [r for r in pick(task, t) if r["method"] != "identity"]
                if not others or ident[t] is None:
                    continue
                best = max(others, key=lambda r: r["acc"])
                versus.append(f"{t}: {name(best)} {_f(best['acc'])} vs {_f(ident[t]['acc'])}")
                if best["acc"] - ident[t]["acc"] > noise:
                    better.append(t)
            verdict = (f"beats `identity` beyond noise on {', '.join(better)}" if better
                       else "never beats `identity` beyond noise")  # fmt: skip
            out.append(f"  The best other method {verdict} ({'; '.join(versus)}).")
            pure = [r for t in related for r in pick(task, t) if r["method"] in ("project", "lorax", "procrustes")]
            if pure:
                top = max(pure, key=lambda r: r["gain_recovery"] if r["gain_recovery"] is not None else -9)
                out.append(
                    f"  Pure subspace methods (`project` / `lorax` / `procrustes`) recover at most "
                    f"{_f(top['gain_recovery'], 2)} of the gain ({name(top)} on {top['target']}): they drop the "
                    f"part of the update outside the top-k singular subspaces (kept energy "
                    f"{_f(top['mean_kept_energy'])} there)."
                )
        for t in unrelated:
            base = base_of(task, t)
            moved = max(pick(task, t), key=lambda r: abs(r["acc"] - base), default=None)
            if moved is None:
                continue
            sims = [r["mean_similarity"] for r in pick(task, t) if r["mean_similarity"] is not None]
            sim_text = f"; mean subspace similarity {min(sims):.2f}-{max(sims):.2f} over k" if sims else ""
            if abs(moved["acc"] - base) <= noise:
                out.append(f"- `{task}`, {t} ({models[t]['arch']}, unrelated to {source}): no method moves accuracy "
                           f"off the base ({_f(base)}) beyond noise (largest change: {name(moved)} "
                           f"{_f(moved['acc'])}{sim_text}).")  # fmt: skip
            else:
                gain = _f(moved["gain_recovery"], 2)
                out.append(
                    f"- `{task}`, {t} ({models[t]['arch']}, unrelated to {source}): largest change "
                    f"{name(moved)} {_f(moved['acc'])} from base {_f(base)} (gain recovery {gain}{sim_text})."
                )
    return out


def full_table(result: dict[str, Any]) -> list[str]:
    lines = ["## All rows", ""]
    for task in result["tasks"]:
        lines += [f"### {task}", "", "| target | method | k | acc | acc_norm | base | oracle | gain recovery | "
                  "mean sim | kept energy | skipped | transfer s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
                  "---:|---:|"]  # fmt: skip
        for r in result["rows"]:
            if r["task"] != task:
                continue
            skipped = "-" if r["skipped"] is None else f"{r['skipped']}/{(r['transferred'] or 0) + r['skipped']}"
            acc = _f(r["acc"]) if r["acc"] is not None or not r["note"] else r["note"]
            lines.append(
                f"| {r['target']} | {r['method']} | {rank_label(r['k'])} | {acc} | {_f(r['acc_norm'])} | "
                f"{_f(r['base_acc'])} | {_f(r['oracle_acc'])} | {_f(r['gain_recovery'], 2)} | "
                f"{_f(r['mean_similarity'])} | {_f(r['mean_kept_energy'])} | {skipped} | "
                f"{_f(r['transfer_seconds'], 2)} |"
            )
        lines.append("")
    return lines


def write_report(result: dict[str, Any], zoo_data: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# Quality benchmark: porting a LoRA across the tiny zoo",
        "",
        f"Produced by `{command}` in {result['seconds']:.0f} s "
        f"({os.cpu_count()} cores, {args.threads} torch thread(s); load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['load'])}). Subspaces: `--svd {args.svd}`; "
        "`full` = k clamped to min(m, n) per module. Accuracy = `loraport.evaluate` (lm-eval `arc_challenge` "
        "scoring); gain recovery = (transferred - base) / (oracle - base), `-` where the oracle gains < 0.05.",
        "",
    ]
    if args.limit:
        lines += [f"**Subset run**: first {args.limit} questions per task (oracle re-scored on the subset).", ""]
    lines += [*headline(result), "", *observations(result, zoo_data), "", *zoo_summary(zoo_data), ""]
    lines += full_table(result)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LoRA transfer quality on the tiny zoo (SPEC sec. 8)")
    parser.add_argument("--zoo", default="benchmarks/work/zoo", help="built zoo directory")
    parser.add_argument("--out", default=None, help="Markdown report (default benchmarks/results/quality.md; "
                        "--quick: benchmarks/work/quality-quick.md)")  # fmt: skip
    parser.add_argument("--work", default="benchmarks/work/quality", help="ported adapters and reports")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--ranks", type=parse_ranks, default=parse_ranks("8,32,64,full"), help="e.g. 8,32,64,full")
    parser.add_argument("--targets", nargs="+", default=None, help="targets (default: all)")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions per task")
    parser.add_argument("--svd", choices=["exact", "randomized"], default="exact")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="smoke test: D15 and X, 3 methods, k=32, 40 questions")
    args = parser.parse_args(argv)
    if args.quick:
        args.targets = args.targets or ["D15", "X"]
        args.methods = ["identity", "project", "prolora"]
        args.ranks = [32]
        args.limit = args.limit or 40
    out = Path(args.out or ("benchmarks/work/quality-quick.md" if args.quick else "benchmarks/results/quality.md"))
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/quality.py", *(argv or sys.argv[1:])])

    from loraport.zoo import load_manifest

    zoo_data = load_manifest(args.zoo).data
    started = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - started
    result["load"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(write_report(result, zoo_data, args, command), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
