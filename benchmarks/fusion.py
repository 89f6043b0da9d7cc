"""Fusion benchmark (issue 4, SPEC sec. 7): fuse two fine-tunes of one base with every method, score both tasks.

    python benchmarks/build_zoo.py --out benchmarks/work/zoo      # once, ~15 min
    python benchmarks/fusion.py --zoo benchmarks/work/zoo         # writes benchmarks/results/fusion.md
    python benchmarks/fusion.py --quick                           # smoke run (tiny training, few questions)

C is the zoo's source model S. A = C fine-tuned on ``facts`` (memorised), B = C fine-tuned on
``addition`` (held-out skill), in two regimes:

* ``full``: every weight trained (embeddings and head included) with the zoo's QA loss
  (answer tokens only, :func:`loraport.zoo.train.qa_examples`), AdamW, seeded;
* ``lora``: the zoo's S-facts and S-addition LoRAs merged into C (``merge_and_unload``).

Each pair is fused with ``rgsp`` (gamma 1, 0.5, 0), ``average``, ``task_arithmetic`` (base C,
scaling 1 and 0.5), ``ties`` (base C, density 0.2 and 0.5), in the full regime also task arithmetic
and TIES on all tensors (embeddings and head included), plus two reference rows that are plain
points on the line through A and B (``task_arithmetic`` with base A: ``A + s (B - A)``, s = 1, 1.5).
C, A, B and every fused model are scored on both tasks (acc, acc_norm: lm-eval
``arc_challenge`` rules). Fuse time is the median wall time of ``--repeats`` runs of
:func:`loraport.fusion.fuse` (evaluation excluded). The two LoRAs are also fused as adapters
(:func:`loraport.fusion.fuse_adapters`) and scored on C with the fused adapter.

The full fine-tunes are cached under the work directory (``--retrain`` redoes them); all
numbers go to ``<work>/results.json``, and ``--report-only`` rewrites the Markdown from it.
About 4-6 minutes on 2 busy cores with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TASKS = ("facts", "addition")
SEED = 0


@dataclass
class Recipe:
    """Full fine-tune of every weight on one task's QA items (loss on the answer tokens only)."""

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    batch_size: int = 32
    warmup: int = 20
    clip: float = 1.0
    seed: int = SEED


RECIPES = {"facts": Recipe(steps=300), "addition": Recipe(steps=1000)}
QUICK_RECIPES = {"facts": Recipe(steps=10), "addition": Recipe(steps=10)}


@dataclass
class Variant:
    """One fusion run: a row label, the method and its options, which base it takes."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    base: str | None = None  # "C" (the common base) or "A" (reference lines through A and B)
    regimes: tuple[str, ...] = ("full", "lora")

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "_", self.label).strip("_")


ALL_TENSORS = {"include": ".", "exclude": ""}
MODEL_VARIANTS = [
    Variant("rgsp gamma=1 (default)", "rgsp", {"gamma": 1.0}),
    Variant("rgsp gamma=0.5", "rgsp", {"gamma": 0.5}),
    Variant("rgsp gamma=0", "rgsp", {"gamma": 0.0}),
    Variant("average", "average"),
    Variant("task_arithmetic s=1", "task_arithmetic", {"scaling": 1.0}, "C"),
    Variant("task_arithmetic s=0.5", "task_arithmetic", {"scaling": 0.5}, "C"),
    Variant("ties d=0.2 (default)", "ties", {"density": 0.2}, "C"),
    Variant("ties d=0.5", "ties", {"density": 0.5}, "C"),
    # Full fine-tunes also change the embeddings and the head, which the default selection averages.
    Variant("task_arithmetic s=1, all tensors", "task_arithmetic", {"scaling": 1.0, **ALL_TENSORS}, "C", ("full",)),
    Variant("ties d=0.2, all tensors", "ties", {"density": 0.2, **ALL_TENSORS}, "C", ("full",)),
    Variant("reference: A + 1.0 (B - A)", "task_arithmetic", {"scaling": 1.0}, "A"),
    Variant("reference: A + 1.5 (B - A)", "task_arithmetic", {"scaling": 1.5}, "A"),
]
ADAPTER_VARIANTS = [
    Variant("rgsp gamma=1 (default)", "rgsp", {"gamma": 1.0}),
    Variant("rgsp gamma=0.5", "rgsp", {"gamma": 0.5}),
    Variant("rgsp gamma=0", "rgsp", {"gamma": 0.0}),
    Variant("average", "average"),
    Variant("task_arithmetic s=1", "task_arithmetic", {"scaling": 1.0}),
    Variant("ties d=0.2 (default)", "ties", {"density": 0.2}),
    Variant("ties d=0.5", "ties", {"density": 0.5}),
]
QUICK_MODEL = {"rgsp gamma=1 (default)", "average", "task_arithmetic s=1", "ties d=0.2 (default)"}


def log(text: str) -> None:
    print(f"[fusion {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- building A and B --------------------------------------------------------------------------


def full_finetune(base_dir: Path, train_jsonl: Path, recipe: Recipe, out: Path) -> dict[str, Any]:
    """Train every weight of ``base_dir`` on the QA items of ``train_jsonl``; save model + tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraport.evaluate import load_arc_jsonl
    from loraport.zoo.tasks import answer_text
    from loraport.zoo.train import collate_qa, projection_weights, qa_examples, relative_drift

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    source = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = load_arc_jsonl(train_jsonl)
    examples = qa_examples(tokenizer, [(r["question"], answer_text(r)) for r in records])
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    started = time.perf_counter()
    order: list[int] = []
    running = math.nan
    for step in range(recipe.steps):
        if step < recipe.warmup:
            factor = (step + 1) / recipe.warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)))
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * factor
        if len(order) < recipe.batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        chosen, order = order[: recipe.batch_size], order[recipe.batch_size :]
        input_ids, labels, mask = collate_qa([examples[i] for i in chosen], tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        running = value if math.isnan(running) else 0.9 * running + 0.1 * value
    seconds = time.perf_counter() - started
    model.eval()
    weights = {n: p.detach() for n, p in model.named_parameters()}
    projections = {n: source[n] for n in projection_weights(model)}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {
        "regime": "full",
        "steps": recipe.steps,
        "train_seconds": seconds,
        "final_loss": running,
        "drift_all_weights": relative_drift(weights, source)["all"],
        "drift_projections": relative_drift(weights, projections)["all"],
    }


def merge_lora(base_dir: Path, lora_dir: Path, out: Path) -> dict[str, Any]:
    """``PeftModel.from_pretrained(C, lora).merge_and_unload()`` saved with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraport.zoo.train import projection_weights, relative_drift

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    source = {n: p.detach().clone() for n, p in projection_weights(model).items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()
    merged.eval()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"regime": "lora", "lora": str(lora_dir), "drift_projections": relative_drift(merged, source)["all"]}


# -- scoring ---------------------------------------------------------------------------------


class Scorer:
    """Scores a model directory (optionally + adapter) on both tasks; caches examples and tokenizer."""

    def __init__(self, zoo: Any, limit: int | None) -> None:
        from loraport.evaluate import load_arc_jsonl

        self.examples = {task: load_arc_jsonl(zoo.eval_path(task), limit) for task in TASKS}
        self.seconds = 0.0

    def __call__(self, model_dir: Path, adapter: Path | None = None) -> dict[str, dict[str, float]]:
        from loraport.evaluate import evaluate, load_model, load_tokenizer

        started = time.perf_counter()
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, adapter)
        scores = {}
        for task, examples in self.examples.items():
            result = evaluate(model, tokenizer, examples, batch_size=64, progress=False)
            scores[task] = {"acc": result.acc, "acc_norm": result.acc_norm, "n": result.n}
        self.seconds += time.perf_counter() - started
        return scores


# -- fusion ----------------------------------------------------------------------------------


def _rgsp_diagnostics(report: Any) -> dict[str, Any]:
    records = report.method_records()
    ratios = [r.tau_proj_norm / r.tau_ortho_norm for r in records if r.tau_proj_norm is not None and r.tau_ortho_norm]
    lams = [r.lam for r in records if r.lam is not None]
    return {
        "max_lambda": max(lams) if lams else None,
        "lambda_zero": sum(1 for v in lams if v == 0.0),
        "lambda_one": sum(1 for v in lams if v == 1.0),
        "min_d": min((r.d for r in records if r.d is not None), default=None),
        "max_d": max((r.d for r in records if r.d is not None), default=None),
        "mean_proj_over_ortho": statistics.fmean(ratios) if ratios else None,
        "positions": sorted(r.position for r in records if r.position is not None),
    }


def _timed(repeats: int, call: Callable[[], Any]) -> tuple[list[float], Any]:
    """Wall times of ``repeats`` calls and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    assert result is not None
    return times, result


def _fused_row(variant: Variant, times: list[float], report: Any, scores: Any, **fields: Any) -> dict[str, Any]:
    """One fused model's row: timing, the report's totals, scores, rgsp diagnostics; ``fields`` per regime."""
    totals = report.totals()
    row = {
        "label": variant.label,
        "kind": "fused",
        "method": variant.method,
        "options": variant.options,
        "fuse_seconds": statistics.median(times),
        "fuse_times": times,
        "mean_position": totals["mean_position"],
        "mean_lambda": totals["mean_lambda"],
        "mean_d": totals["mean_d"],
        **fields,
        "scores": scores,
    }
    if variant.method == "rgsp":
        row.update(_rgsp_diagnostics(report))
    return row


def run_model_fusions(
    regime: str, paths: dict[str, Path], work: Path, variants: list[Variant], repeats: int, score: Scorer
) -> list[dict[str, Any]]:
    from loraport.fusion import fuse

    rows = []
    for name in ("C", "A", "B"):
        scores = score(paths[name])
        rows.append({"label": name, "role": name, "kind": "input", "scores": scores})
        log(f"{regime}: {name}: {_brief(scores)}")
    for variant in variants:
        if regime not in variant.regimes:
            continue
        out = work / "fused" / regime / variant.slug
        base = paths[variant.base] if variant.base else None
        times, result = _timed(
            repeats,
            lambda out=out, base=base, variant=variant: fuse(
                paths["A"],
                paths["B"],
                out,
                base=base,
                method=variant.method,
                overwrite=True,
                progress=False,
                **variant.options,
            ),
        )
        totals = result.report.totals()
        row = _fused_row(
            variant,
            times,
            result.report,
            score(out),
            base=variant.base,
            actions=totals["actions"],
            gw_unconverged=totals["gw_unconverged"],
        )
        rows.append(row)
        log(f"{regime}: {variant.label}: {_brief(row['scores'])} fuse {row['fuse_seconds']:.2f}s")
    return rows


def run_adapter_fusions(
    zoo: Any, work: Path, variants: list[Variant], repeats: int, score: Scorer
) -> list[dict[str, Any]]:
    from loraport.fusion import fuse_adapters

    base = zoo.model_path(zoo.source)
    loras = {task: zoo.lora_path(zoo.source, task) for task in TASKS}
    rows = [{"label": "C", "role": "C", "kind": "input", "scores": score(base)}]
    for role, (task, path) in zip(("A", "B"), loras.items(), strict=True):
        scores = score(base, path)
        rows.append({"label": f"C + LoRA {task} ({role})", "role": role, "kind": "input", "scores": scores})
        log(f"adapter: C + LoRA {task}: {_brief(scores)}")
    for variant in variants:
        out = work / "fused" / "adapter" / variant.slug
        times, result = _timed(
            repeats,
            lambda out=out, variant=variant: fuse_adapters(
                loras["facts"],
                loras["addition"],
                out,
                method=variant.method,
                overwrite=True,
                progress=False,
                **variant.options,
            ),
        )
        row = _fused_row(
            variant,
            times,
            result.report,
            score(base, out),
            max_dropped_energy=result.report.totals()["max_dropped_energy"],
        )
        rows.append(row)
        log(f"adapter: {variant.label}: {_brief(row['scores'])} fuse {row['fuse_seconds']:.2f}s")
    return rows


def _brief(scores: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{task} {s['acc']:.3f}/{s['acc_norm']:.3f}" for task, s in scores.items())


# -- the report ------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _sci(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def mean_acc(row: dict[str, Any]) -> float:
    return statistics.fmean(row["scores"][task]["acc"] for task in TASKS)


SPECIALIST = {"facts": "A", "addition": "B"}


def gain_kept(rows: list[dict[str, Any]], row: dict[str, Any], task: str) -> float | None:
    """``(fused - C) / (specialist - C)`` on ``task`` (acc): 1 = the specialist's gain, 0 = C's level."""
    roles = {r["role"]: r for r in rows if r["kind"] == "input"}
    base = roles["C"]["scores"][task]["acc"]
    top = roles[SPECIALIST[task]]["scores"][task]["acc"]
    return None if top - base <= 0 else (row["scores"][task]["acc"] - base) / (top - base)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def score_table(rows: list[dict[str, Any]], adapter: bool = False) -> list[str]:
    extra = "max dropped energy" if adapter else "fused tensors"
    lines = [
        f"| model / method | facts acc | facts acc_norm | addition acc | addition acc_norm | mean acc | "
        f"gain kept facts / addition | mean position | {extra} | fuse time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["scores"]
        if row["kind"] == "input":
            tail = "| | |"
        else:
            if adapter:
                what = _sci(row.get("max_dropped_energy"))
            else:
                actions = row["actions"]
                what = f"{actions.get(row['method'], 0)} of {sum(actions.values())}"
            tail = f"| {_num(row['mean_position'], 2)} | {what} | {row['fuse_seconds']:.2f} |"
        kept = f"{_pct(gain_kept(rows, row, 'facts'))} / {_pct(gain_kept(rows, row, 'addition'))}"
        lines.append(
            f"| {row['label']} | {_num(s['facts']['acc'])} | {_num(s['facts']['acc_norm'])} | "
            f"{_num(s['addition']['acc'])} | {_num(s['addition']['acc_norm'])} | {_num(mean_acc(row))} | {kept} {tail}"
        )
    return lines


def diagnostics_table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| regime | gamma | mean lambda | max lambda | matrices with lambda = 0 / = 1 | mean d (min-max) | "
        "mean position (min-max) | mean norm(tau_proj) / norm(tau_ortho) | GW unconverged | fuse time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime, rows in results.items():
        for row in rows:
            if row.get("method") != "rgsp":
                continue
            positions = row["positions"]
            n = len(positions)
            lines.append(
                f"| {regime} | {row['options']['gamma']:g} | {_sci(row['mean_lambda'])} | {_sci(row['max_lambda'])} | "
                f"{row['lambda_zero']} / {row.get('lambda_one', 0)} of {n} | {_num(row['mean_d'])} "
                f"({_num(row['min_d'])}-{_num(row['max_d'])}) | {_num(row['mean_position'])} "
                f"({_num(positions[0] if n else None)}-{_num(positions[-1] if n else None)}) | "
                f"{_sci(row['mean_proj_over_ortho'])} | {row.get('gw_unconverged', 0)} | {row['fuse_seconds']:.2f} |"
            )
    return lines


def find(rows: list[dict[str, Any]], label: str) -> dict[str, Any] | None:
    return next((row for row in rows if row["label"] == label), None)


def _acc(row: dict[str, Any], task: str) -> float:
    return row["scores"][task]["acc"]


def _both(row: dict[str, Any]) -> str:
    return f"{_acc(row, 'facts'):.3f} / {_acc(row, 'addition'):.3f}"


def summary(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> list[str]:
    """The short answer to issue 4's question, with the deciding numbers."""
    lines = ["**In short.**", ""]
    regimes = [regime for regime, rows in results.items() if find(rows, "rgsp gamma=1 (default)")]
    if not regimes:
        return []
    keeps_a = {}
    for regime in regimes:
        rows = results[regime]
        keeps_a[regime] = gain_kept(rows, find(rows, "rgsp gamma=1 (default)"), "facts") or 0.0
    positions = [find(results[r], "rgsp gamma=1 (default)")["mean_position"] for r in regimes]
    if all(v < 0.15 for v in keeps_a.values()):
        lines.append(
            f"- rgsp at its default gamma = 1 does not fuse on this zoo: in all {len(regimes)} settings it lands "
            f"past B on the A->B line (mean position {min(positions):.2f}-{max(positions):.2f}) and keeps "
            f"{_pct(min(keeps_a.values()))} to {_pct(max(keeps_a.values()))} of A's gain on `facts`; it behaves like "
            "B (or an extrapolation of B), not like a merge."
        )
    else:
        lines.append(
            "- rgsp at gamma = 1 keeps "
            + ", ".join(f"{_pct(v)} of A's gain ({r})" for r, v in keeps_a.items())
            + f", at mean position {min(positions):.2f}-{max(positions):.2f} on the A->B line."
        )
    for regime in regimes:
        rows = results[regime]
        r1, avg, t2 = find(rows, "rgsp gamma=1 (default)"), find(rows, "average"), find(rows, "ties d=0.2 (default)")
        fused = [r for r in rows if r["kind"] == "fused" and not r["label"].startswith("reference")]

        def worst(row: dict[str, Any], rows: list[dict[str, Any]] = rows) -> float:
            return min(gain_kept(rows, row, task) or 0.0 for task in TASKS)

        good = sorted((r for r in fused if worst(r) >= 0.25), key=worst, reverse=True)
        drift = meta["builds"]["lora"]
        lines.append(
            f"- {regime}: rgsp gamma 1 {_both(r1)} vs average {_both(avg)} vs TIES (d=0.2) {_both(t2)} "
            f"(facts / addition acc). "
            + (
                "Merges that keep at least 25% of both gains: "
                + ", ".join(
                    f"{r['label']} ({_both(r)}, {_pct(gain_kept(rows, r, 'facts'))} / "
                    f"{_pct(gain_kept(rows, r, 'addition'))})"
                    for r in good
                )
                + ("; rgsp at no gamma is among them." if not any(r.get("method") == "rgsp" for r in good) else ".")
                if good
                else "No method keeps at least 25% of both gains here"
                + (
                    ": with B's update added, A's facts are gone whatever the method (the zoo's LoRA updates are "
                    f"large: ||dW|| / ||W|| over the projections {drift['A']['drift_projections']:.2f} for facts, "
                    f"{drift['B']['drift_projections']:.2f} for addition)."
                    if regime in ("lora", "adapter")
                    else "."
                )
            )
        )
    harm_b = []
    for regime in regimes:
        rows = results[regime]
        r1, r05 = find(rows, "rgsp gamma=1 (default)"), find(rows, "rgsp gamma=0.5")
        if r05 is not None:
            harm_b.append((regime, _acc(r1, "addition") - _acc(r05, "addition")))
    if harm_b:
        hurt = [r for r, d in harm_b if d < -0.03]
        lines.append(
            "- gamma = 1 extrapolates: rgsp's matrices sit at position about 0.5 + gamma on the A->B line, so "
            "gamma = 1 is about 1.5 B - 0.5 A, gamma = 0.5 about B, gamma = 0 exactly the average. Moving towards "
            "B already discards A's task (gamma 1 and 0.5 alike); the extra step past B changes B's own task by "
            + ", ".join(f"{d:+.3f} ({r})" for r, d in harm_b)
            + " addition acc (gamma 1 minus gamma 0.5): "
            + (
                f"harmful in {', '.join(hurt)}, within noise elsewhere."
                if hurt
                else "within noise: the extrapolation itself does no measurable harm to B's task here."
            )
        )
    return lines


def findings(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> list[str]:
    """The findings, written from the numbers (wording chosen by comparisons, so a rerun stays honest)."""
    regime_names = {"full": "full fine-tune", "lora": "LoRA merged", "adapter": "adapter-level"}
    out = [
        *summary(results, meta),
        "",
        f"Accuracies below are `acc` as *facts / addition*; each task has {meta['n_eval']} questions, so one "
        f"standard error is at most {0.5 / math.sqrt(meta['n_eval']):.3f} and a difference between two models under "
        f"about {1 / math.sqrt(meta['n_eval']):.2f} should not be read as real. "
        "One seed, one pair of tasks, tiny models.",
        "",
        "**Which fused model keeps both skills.** Gain kept = (fused - C) / (specialist - C), per task.",
        "",
    ]
    for regime, rows in results.items():
        fused = [r for r in rows if r["kind"] == "fused" and not r["label"].startswith("reference")]

        def worst(row: dict[str, Any], rows: list[dict[str, Any]] = rows) -> float:
            return min(gain_kept(rows, row, task) or 0.0 for task in TASKS)

        best = max(fused, key=worst)
        roles = {r["role"]: r for r in rows if r["kind"] == "input"}
        best_input = max(mean_acc(roles["A"]), mean_acc(roles["B"]))
        above = [r for r in fused if mean_acc(r) > best_input + 1e-9]
        out.append(
            f"- {regime_names[regime]}: C {_both(roles['C'])}, A {_both(roles['A'])}, B {_both(roles['B'])}. "
            + (
                f"Best worst-task gain kept: **{best['label']}** ({_both(best)}, gain kept "
                f"{_pct(gain_kept(rows, best, 'facts'))} / {_pct(gain_kept(rows, best, 'addition'))}). "
                if worst(best) >= 0.15
                else f"No method keeps even 15% of both gains (the best worst-task gain kept is {_pct(worst(best))}, "
                f"{best['label']}). "
            )
            + (
                f"{len(above)} method(s) beat the better single input's mean acc ({best_input:.3f}): "
                + ", ".join(f"{r['label']} {mean_acc(r):.3f}" for r in sorted(above, key=mean_acc, reverse=True))
                + "."
                if above
                else f"No fused model beats the better single input's mean acc ({best_input:.3f}): "
                "no method combines the two skills here."
            )
        )
    out += ["", "**rgsp compared with average and TIES.**", ""]
    for regime, rows in results.items():
        r1, r05, r0 = (find(rows, label) for label in ("rgsp gamma=1 (default)", "rgsp gamma=0.5", "rgsp gamma=0"))
        avg, t2, t5 = (find(rows, label) for label in ("average", "ties d=0.2 (default)", "ties d=0.5"))
        ta = find(rows, "task_arithmetic s=1")
        if not (r1 and avg and t2):
            continue
        facts_kept = gain_kept(rows, r1, "facts") or 0.0
        verdict = (
            "rgsp (gamma 1) keeps essentially none of A's task"
            if facts_kept < 0.15
            else f"rgsp (gamma 1) keeps {_pct(facts_kept)} of A's task"
        )

        def compare(other: dict[str, Any], r1: dict[str, Any] = r1) -> str:
            delta = mean_acc(r1) - mean_acc(other)
            return "higher than" if delta > 0.03 else "lower than" if delta < -0.03 else "about equal to"

        cmp_avg, cmp_ties = compare(avg), compare(t2)
        text = (
            f"- {regime_names[regime]}: rgsp gamma 1 {_both(r1)} (mean {mean_acc(r1):.3f}), average {_both(avg)} "
            f"({mean_acc(avg):.3f}), ties d=0.2 {_both(t2)} ({mean_acc(t2):.3f})"
            + (f", ties d=0.5 {_both(t5)} ({mean_acc(t5):.3f})" if t5 else "")
            + (f", task_arithmetic s=1 {_both(ta)} ({mean_acc(ta):.3f})" if ta else "")
            + f". {verdict}; its mean acc is {cmp_avg} average's and {cmp_ties} TIES' (density 0.2)"
            + (
                f", but that mean comes from B's task alone (rgsp lands at position {r1['mean_position']:.2f} on A->B)."
                if facts_kept < 0.15
                else "."
            )
        )
        if r0 is not None and r0["scores"] == avg["scores"]:
            text += " gamma 0 gives exactly the average's scores (as the formula says)."
        out.append(text)
    out += ["", "**Does gamma = 1 extrapolate harmfully?**", ""]
    for regime, rows in results.items():
        r1, r05, avg = (find(rows, label) for label in ("rgsp gamma=1 (default)", "rgsp gamma=0.5", "average"))
        roles = {r["role"]: r for r in rows if r["kind"] == "input"}
        ref15, ref10 = find(rows, "reference: A + 1.5 (B - A)"), find(rows, "reference: A + 1.0 (B - A)")
        if not (r1 and r05 and avg):
            continue
        b_task = _acc(r1, "addition") - _acc(r05, "addition")
        b_vs_b = _acc(r1, "addition") - _acc(roles["B"], "addition")
        harm_b = (
            f"past B it also costs B's own task {-b_task:.3f} vs gamma 0.5"
            if b_task < -0.03
            else f"going past B does not cost B's own task (addition {_acc(r1, 'addition'):.3f} at gamma 1, "
            f"{_acc(r05, 'addition'):.3f} at gamma 0.5, {_acc(roles['B'], 'addition'):.3f} for B)"
        )
        text = (
            f"- {regime_names[regime]}: mean position {r1['mean_position']:.2f} (gamma 1), "
            f"{r05['mean_position']:.2f} (gamma 0.5), 0.50 (gamma 0). gamma 1 {_both(r1)}, gamma 0.5 {_both(r05)}, "
            f"average {_both(avg)}: A's task drops from {_acc(roles['A'], 'facts'):.3f} (A) to "
            f"{_acc(r1, 'facts'):.3f} (C has {_acc(roles['C'], 'facts'):.3f}); {harm_b}; vs B alone: "
            f"{b_vs_b:+.3f} on addition."
        )
        if ref15 is not None:
            gap = max(abs(_acc(r1, task) - _acc(ref15, task)) for task in TASKS)
            text += (
                f" The plain line point A + 1.5 (B - A) scores {_both(ref15)}"
                + (f" and A + 1.0 (B - A) {_both(ref10)}" if ref10 else "")
                + (
                    f": within {gap:.3f} of rgsp gamma 1, so rgsp's subspace machinery changes nothing measurable "
                    "beyond where it puts the weights on the line."
                    if gap <= 0.03
                    else f": rgsp gamma 1 differs from it by up to {gap:.3f}."
                )
            )
        out.append(text)
    big = [
        (regime, row)
        for regime, rows in results.items()
        for row in rows
        if row["label"] == "rgsp gamma=1 (default)" and (row.get("max_lambda") or 0) > 0.01
    ]
    out += [
        "",
        "**RGSP internals.** W* = (A + B)/2 + gamma (lambda tau_proj + (1 - lambda) tau_ortho) with "
        "tau_ortho = (B - A) - tau_proj: where lambda is about 0 and tau_proj is small, W* is about "
        "(A + B)/2 + gamma (B - A) (position 0.5 + gamma); where lambda is clamped at 1, W* = (A + B)/2 + gamma "
        "tau_proj, about the average (position 0.5)."
        + (
            " Lambda is not always small here (docs/fusion.md reports 1e-7 to 1e-5 on its cases): it reaches "
            + ", ".join(f"{row['max_lambda']:.3g} ({regime})" for regime, row in big)
            + "; s_rel is in singular-value units, so large updates give a large lambda."
            if big
            else ""
        ),
        "",
    ]
    for regime, rows in results.items():
        r1 = find(rows, "rgsp gamma=1 (default)")
        if r1 is None:
            continue
        n = len(r1["positions"])
        out.append(
            f"- {regime_names[regime]}: lambda mean {_sci(r1['mean_lambda'])}, max {_sci(r1['max_lambda'])} "
            f"({r1['lambda_zero']} of {n} matrices at 0, {r1.get('lambda_one', 0)} clamped at 1); d "
            f"{_num(r1['min_d'])}-{_num(r1['max_d'])}; ||tau_proj|| / ||tau_ortho|| {_sci(r1['mean_proj_over_ortho'])} "
            "on average."
        )
    merged, adapter = results.get("lora", []), results.get("adapter", [])
    same = [
        label
        for label in ("average", "task_arithmetic s=1")
        if find(merged, label)
        and find(adapter, label)
        and find(merged, label)["scores"] == find(adapter, label)["scores"]
    ]
    if same:
        out += [
            "",
            f"**Consistency.** Adapter-level {' and '.join(same)} score exactly as the same method on the merged "
            "models (the same weights, C + (dW_A + dW_B) / 2 or C + dW_A + dW_B); ties and rgsp differ between "
            "the two levels because they act on dW instead of W (and the adapter result is truncated to rank 32).",
        ]
    times = [(regime, r["fuse_seconds"]) for regime, rows in results.items() for r in rows if r.get("method") == "rgsp"]
    base_times = [
        r["fuse_seconds"] for rows in results.values() for r in rows if r.get("method") in ("average", "ties")
    ]
    if times and base_times:
        out += [
            "",
            f"**Cost.** rgsp takes {min(t for _, t in times):.1f}-{max(t for _, t in times):.1f} s per fusion "
            f"(exact SVD + a GW solve per matrix), average and TIES {min(base_times):.2f}-{max(base_times):.2f} s.",
        ]
    return out


def write_markdown(path: Path, data: dict[str, Any], notes: str) -> None:
    results = data["results"]
    meta = data["meta"]
    reused = any(info.get("reused") for info in meta["builds"]["full"].values())
    lines = [
        "# Fusion benchmark (issue 4)",
        "",
        "Generated by `benchmarks/fusion.py` (tables and findings alike)."
        + ("" if not meta["quick"] else " QUICK SMOKE RUN: too little training, the numbers mean nothing."),
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"- machine: {meta['machine']}; torch threads: {meta['threads']}; load average at start "
        f"{meta['loadavg']} (the 2 cores were shared with other agents' benchmarks)",
        f"- versions: {meta['versions']}",
        f"- total runtime {meta['total_seconds']:.0f} s (training A and B: {meta['train_seconds']:.0f} s"
        + (" (full fine-tunes reused from an earlier run: pass --retrain)" if reused else "")
        + ", "
        f"fusion incl. repeats: {meta['fuse_seconds']:.0f} s, evaluation: {meta['eval_seconds']:.0f} s)",
        f"- fuse time: median of {meta['repeats']} runs of `fuse` / `fuse_adapters` (reading, fusing, writing "
        "the output directory; evaluation not included)",
        f"- evaluation: `loraport.evaluate` (lm-eval `arc_challenge` rules), {meta['n_eval']} questions per task; "
        "`facts` is evaluated on its training questions (memorisation), `addition` on held-out pairs",
        "",
        "## Setup",
        "",
        "C = the zoo's source model S (Llama, hidden 128, 4 layers, 794k parameters). A is C fine-tuned on "
        "`facts`, B is C fine-tuned on `addition`, in two regimes:",
        "",
        "- **full fine-tune**: every weight (embeddings and output head included), loss on the answer tokens "
        "of `Question: q\\nAnswer: a` (`loraport.zoo.train.qa_examples`), AdamW, batch 32, 20 warm-up steps "
        "then cosine to 0, gradient clipping 1.0, seed 0: "
        + "; ".join(
            f"`{task}` {r['steps']} steps, lr {r['lr']:g}, weight decay {r['weight_decay']:g}"
            for task, r in meta["recipes"].items()
        )
        + ".",
        "- **LoRA merged in**: the zoo's S-facts and S-addition LoRAs (PEFT r=16, alpha 32, all seven "
        "projections) merged into C with `merge_and_unload()`.",
        "",
        "| regime | model | how | facts acc | addition acc | relative weight change vs C |",
        "|---|---|---|---|---|---|",
    ]
    for regime, info in meta["builds"].items():
        rows = results[regime]
        for name, task in (("A", "facts"), ("B", "addition")):
            b = info[name]
            how = (
                f"{b['steps']} steps, {b['train_seconds']:.0f} s, final loss {b['final_loss']:.3f}"
                if regime == "full"
                else "LoRA merged"
            )
            change = (
                f"{b['drift_projections']:.3f} (projections), {b['drift_all_weights']:.3f} (all weights)"
                if regime == "full"
                else f"{b['drift_projections']:.3f} (projections)"
            )
            s = find(rows, name)["scores"]
            lines.append(
                f"| {regime} | {name} ({task}) | {how} | {s['facts']['acc']:.3f} | {s['addition']['acc']:.3f} | "
                f"{change} |"
            )
    lines += [
        "",
        "Methods (all through `loraport.fusion.fuse` with default options unless stated: the same tensors go "
        "through every method, i.e. every 2-D weight except the embedding and the output head, which are "
        "averaged; bit-identical tensors are copied): `rgsp` at gamma 1 (the seed's default), 0.5 and 0; "
        "`average`; `task_arithmetic` with base C, scaling 1 and 0.5; `ties` with base C, density 0.2 "
        "(default) and 0.5. In the full regime also `task_arithmetic` s=1 and `ties` d=0.2 on *all* tensors "
        "(`include='.', exclude=''`: the fine-tunes changed the embeddings and head too, which the default "
        "selection only averages). The two `reference` rows are not methods: `task_arithmetic` with base **A** gives "
        "`A + s (B - A)` on the same tensors (embeddings averaged, as for every method), i.e. points on the "
        "line through A and B, to compare rgsp with a plain extrapolation. *mean position* is the report's "
        "`<W* - W_A, W_B - W_A> / ||W_B - W_A||^2` averaged over the fused tensors (0 = A, 0.5 = average, "
        "1 = B, 1.5 = extrapolated past B). *gain kept* = (fused - C) / (specialist - C) on acc, the "
        "specialist being A for `facts` and B for `addition` (100%: the specialist's level, 0%: C's).",
        "",
        "## Full fine-tune",
        "",
        *score_table(results["full"]),
        "",
        "## LoRA merged in",
        "",
        *score_table(results["lora"]),
        "",
        "## Adapter-level fusion",
        "",
        "`fuse_adapters(S-facts, S-addition)` (output rank bound r_A + r_B = 32, default), the fused adapter "
        "applied to C. *mean position* is over the modules' `dW`; ties and rgsp form the dense `dW` and "
        "truncate it to rank 32 (*max dropped energy*: the largest fraction of `||dW||^2` lost to it); "
        "average and task_arithmetic stay factored and report no position (average is 0.5 by construction).",
        "",
        *score_table(results["adapter"], adapter=True),
        "",
        "## RGSP diagnostics (from the fusion report, over the fused matrices)",
        "",
        *diagnostics_table(results),
        "",
        "## Findings",
        "",
        *findings(results, meta),
        "",
        notes.strip(),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


# -- main ------------------------------------------------------------------------------------


def build_inputs(zoo: Any, work: Path, recipes: dict[str, Recipe], retrain: bool) -> dict[str, Any]:
    """A and B of both regimes under ``work/models`` (reused when the saved recipe matches)."""
    source = zoo.model_path(zoo.source)
    builds: dict[str, dict[str, Any]] = {"full": {}, "lora": {}}
    paths: dict[str, dict[str, Path]] = {"full": {"C": source}, "lora": {"C": source}}
    for name, task in (("A", "facts"), ("B", "addition")):
        out = work / "models" / f"full-{task}"
        meta_path = out / "fusion_bench.json"
        recipe = recipes[task]
        wanted = {"recipe": vars(recipe), "source": str(source)}
        if not retrain and meta_path.is_file() and json.loads(meta_path.read_text())["wanted"] == wanted:
            info = json.loads(meta_path.read_text())["info"]
            info["reused"] = True
            log(f"full {name} ({task}): reusing {out}")
        else:
            log(f"full {name} ({task}): training {recipe.steps} steps")
            info = full_finetune(source, zoo.path(zoo.tasks[task]["train"]), recipe, out)
            meta_path.write_text(json.dumps({"wanted": wanted, "info": info}, indent=2))
            info["reused"] = False
        builds["full"][name] = info
        paths["full"][name] = out
        out = work / "models" / f"lora-{task}"
        builds["lora"][name] = merge_lora(source, zoo.lora_path(zoo.source, task), out)
        paths["lora"][name] = out
    return {"builds": builds, "paths": paths}


def _versions() -> str:
    import peft
    import torch
    import transformers

    try:
        import ot

        pot = ot.__version__
    except ImportError:  # pragma: no cover
        pot = "absent"
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, POT {pot}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="benchmarks/work/zoo", help="built zoo (benchmarks/build_zoo.py)")
    parser.add_argument("--work", default=None, help="work directory (default benchmarks/work/fusion[-quick])")
    parser.add_argument("--out", default=None, help="Markdown result (default benchmarks/results/fusion.md)")
    parser.add_argument("--notes", default=None, help="Markdown file appended to the findings")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the Markdown from the work directory's results.json"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a loaded 2-core machine)")
    parser.add_argument("--repeats", type=int, default=None, help="fuse runs per method, median reported (3)")
    parser.add_argument("--retrain", action="store_true", help="retrain the full fine-tunes even if saved")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 training steps, 40 questions, 1 repeat")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from loraport.zoo import load_manifest

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    zoo = load_manifest(args.zoo)
    quick = args.quick
    work = Path(args.work or ("benchmarks/work/fusion-quick" if quick else "benchmarks/work/fusion"))
    out = Path(args.out or (work / "fusion.md" if quick else "benchmarks/results/fusion.md"))
    repeats = args.repeats or (1 if quick else 3)
    recipes = QUICK_RECIPES if quick else RECIPES
    limit = 40 if quick else None
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else ""
    if args.report_only:
        data = json.loads((work / "results.json").read_text(encoding="utf-8"))
        write_markdown(out, data, notes)
        log(f"rewrote {out} from {work / 'results.json'}")
        return 0

    t0 = time.perf_counter()
    inputs = build_inputs(zoo, work, recipes, args.retrain)
    train_seconds = time.perf_counter() - t0
    score = Scorer(zoo, limit)
    variants = [v for v in MODEL_VARIANTS if not quick or v.label in QUICK_MODEL]
    adapter_variants = [v for v in ADAPTER_VARIANTS if not quick or v.label in QUICK_MODEL]
    results = {}
    fuse_started = time.perf_counter()
    for regime in ("full", "lora"):
        results[regime] = run_model_fusions(regime, inputs["paths"][regime], work, variants, repeats, score)
    results["adapter"] = run_adapter_fusions(zoo, work, adapter_variants, repeats, score)
    fuse_seconds = time.perf_counter() - fuse_started - score.seconds

    command = shlex.join(["python", "benchmarks/fusion.py", *(sys.argv[1:] if argv is None else argv)])
    data = {
        "meta": {
            "command": command,
            "quick": quick,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
            "threads": args.threads,
            "loadavg": loadavg,
            "versions": _versions(),
            "repeats": repeats,
            "n_eval": len(score.examples["facts"]),
            "recipes": {task: vars(r) for task, r in recipes.items()},
            "builds": inputs["builds"],
            "train_seconds": train_seconds,
            "fuse_seconds": fuse_seconds,
            "eval_seconds": score.seconds,
            "total_seconds": time.perf_counter() - started,
        },
        "results": results,
    }
    (work / "results.json").write_text(json.dumps(data, indent=2, default=str))
    write_markdown(out, data, notes)
    log(f"wrote {out} and {work / 'results.json'} in {data['meta']['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
