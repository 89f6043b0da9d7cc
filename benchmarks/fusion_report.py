"""The Markdown of the fusion benchmark (``benchmarks/fusion.py``): tables, targets and findings from results.json."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

REGIME_NAMES = {"full": "full fine-tune", "lora": "LoRA merged into C", "adapter": "adapters (Core Space)"}
# The targets: the share of *both* (every) task's gain a method must keep.
TARGETS = {"full": 0.8, "lora": 0.5, "adapter": 0.5}


def gain_kept(acc: float, base: float, specialist: float) -> float:
    """``(acc - C) / (specialist - C)``: 1 = the specialist's level, 0 = C's (nan when they are equal)."""
    gap = specialist - base
    return (acc - base) / gap if abs(gap) > 1e-9 else float("nan")


def normalised(acc: float, specialist: float) -> float:
    """``acc / specialist``: the merging literature's normalised accuracy."""
    return acc / specialist if specialist > 0 else float("nan")


def _pct(value: float | None) -> str:
    return "" if value is None or value != value else f"{100 * value + 0.0:.0f}%".replace("-0%", "0%")


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def row_metrics(scores: dict[str, Any], refs: dict[str, Any], tasks: tuple[str, ...]) -> dict[str, Any]:
    gains = [gain_kept(scores[t]["acc"], refs["C"][t], refs["spec"][t]) for t in tasks]
    norms = [normalised(scores[t]["acc"], refs["spec"][t]) for t in tasks]
    return {"gains": gains, "worst_gain": min(gains), "mean_norm": statistics.fmean(norms)}


def _chosen(row: dict[str, Any]) -> str:
    if not row["grid"]:
        return "fixed"
    return ", ".join(f"{k} {v:g}" if isinstance(v, float | int) else f"{k} {v}" for k, v in row["chosen"].items())


def merge_table(block: dict[str, Any], regime: str) -> list[str]:
    tasks = tuple(block["tasks"])
    refs = block["refs"]
    head = " | ".join(f"{t} acc" for t in tasks)
    lines = [
        f"| model / method | chosen on dev | {head} | gain kept ({' / '.join(tasks)}) | mean normalised acc | "
        "position on A->B | fuse time (s) |",
        "|---" * (len(tasks) + 6) + "|",
    ]
    c_scores = refs["C_scores"]
    lines.append(
        f"| C | | {' | '.join(_num(c_scores[t]['acc']) for t in tasks)} | {' / '.join('0%' for _ in tasks)} | "
        f"{_num(row_metrics(c_scores, refs, tasks)['mean_norm'])} | | |"
    )
    for task, scores in refs["specialists"].items():
        m = row_metrics(scores, refs, tasks)
        who = "C + LoRA" if regime == "adapter" else "specialist"
        lines.append(
            f"| {who} {task} | | {' | '.join(_num(scores[t]['acc']) for t in tasks)} | "
            f"{' / '.join(_pct(g) for g in m['gains'])} | {_num(m['mean_norm'])} | | |"
        )
    for row in block["rows"]:
        m = row_metrics(row["scores"], refs, tasks)
        position = _num(row["mean_position"], 2) if row["mean_position"] is not None else ""
        lines.append(
            f"| {row['label']} | {_chosen(row)} | {' | '.join(_num(row['scores'][t]['acc']) for t in tasks)} | "
            f"{' / '.join(_pct(g) for g in m['gains'])} | {_num(m['mean_norm'])} | {position} | "
            f"{row['fuse_seconds']:.2f} |"
        )
    return lines


def best_rows(block: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Rows sorted by worst-task gain kept on the evaluation questions (then mean normalised accuracy)."""
    tasks = tuple(block["tasks"])
    scored = [(row, row_metrics(row["scores"], block["refs"], tasks)) for row in block["rows"]]
    return sorted(scored, key=lambda item: (item[1]["worst_gain"], item[1]["mean_norm"]), reverse=True)


def targets_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| regime | merge | target (gain kept on every task) | best method (worst task) | gains kept | met? | "
        "methods meeting it |",
        "|---|---|---|---|---|---|---|",
    ]
    for regime, merges in results.items():
        for merge, block in merges.items():
            ranked = best_rows(block)
            if not ranked:
                continue
            row, m = ranked[0]
            target = TARGETS[regime]
            meeting = [r["label"] for r, mm in ranked if mm["worst_gain"] >= target]
            lines.append(
                f"| {regime} | {merge} | >= {target:.0%} | {row['label']} ({_chosen(row)}) | "
                f"{' / '.join(_pct(g) for g in m['gains'])} | {'yes' if m['worst_gain'] >= target else 'no'} | "
                f"{', '.join(meeting) if meeting else 'none'} |"
            )
    return lines


def rgsp_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| regime | merge | rgsp gamma=1 (seed): gains kept, position | gamma chosen on dev | "
        "its gains kept, position |",
        "|---|---|---|---|---|",
    ]
    for regime, merges in results.items():
        for merge, block in merges.items():
            rows = {r["label"]: r for r in block["rows"]}
            seed, tuned = rows.get("rgsp gamma=1 (seed)"), rows.get("rgsp, gamma on dev")
            if seed is None or tuned is None:
                continue
            tasks = tuple(block["tasks"])
            g1 = row_metrics(seed["scores"], block["refs"], tasks)["gains"]
            g2 = row_metrics(tuned["scores"], block["refs"], tasks)["gains"]
            lines.append(
                f"| {regime} | {merge} | {' / '.join(_pct(g) for g in g1)}, {_num(seed['mean_position'], 2)} | "
                f"{tuned['chosen']['gamma']:g} | {' / '.join(_pct(g) for g in g2)}, "
                f"{_num(tuned['mean_position'], 2)} |"
            )
    return lines


def cost_table(results: dict[str, Any]) -> list[str]:
    labels: list[str] = []
    for merges in results.values():
        for block in merges.values():
            labels += [r["label"] for r in block["rows"] if r["label"] not in labels]
    columns = [(regime, merge) for regime, merges in results.items() for merge in merges]
    lines = [
        "| method | " + " | ".join(f"{regime} {merge}" for regime, merge in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for label in labels:
        cells = []
        for regime, merge in columns:
            row = next((r for r in results[regime][merge]["rows"] if r["label"] == label), None)
            cells.append(f"{row['fuse_seconds']:.2f}" if row else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def probe_table(probe: list[dict[str, Any]]) -> list[str]:
    weights = sorted({row["weight"] for row in probe})
    lines = [
        "| C + LoRA X + w LoRA Y | " + " | ".join(f"w = {w:g}" for w in weights) + " |",
        "|---" * (len(weights) + 1) + "|",
    ]
    seen: list[tuple[str, str]] = []
    for row in probe:
        if (row["full"], row["added"]) not in seen:
            seen.append((row["full"], row["added"]))
    for full, added in seen:
        cells = []
        for w in weights:
            row = next(r for r in probe if r["full"] == full and r["added"] == added and r["weight"] == w)
            cells.append(f"{row['acc'][full]:.3f} / {row['acc'][added]:.3f}")
        lines.append(f"| X = {full}, Y = {added} ({full} acc / {added} acc) | " + " | ".join(cells) + " |")
    return lines


def findings(results: dict[str, Any]) -> list[str]:
    out = []
    for regime, merges in results.items():
        for merge, block in merges.items():
            ranked = best_rows(block)
            if not ranked:
                continue
            tasks = tuple(block["tasks"])
            labels = {r["label"]: (r, m) for r, m in ranked}
            best, bm = ranked[0]
            parts = []
            for label in ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "regmean (task inputs)"):
                if label == best["label"]:
                    continue
                if label in labels:
                    m = labels[label][1]
                    parts.append(f"{label} {' / '.join(_pct(g) for g in m['gains'])}")
            out.append(
                f"- {REGIME_NAMES[regime]}, {merge} ({' / '.join(tasks)}): best worst-task gain kept "
                f"**{best['label']}** ({' / '.join(_pct(g) for g in bm['gains'])}, mean normalised acc "
                f"{bm['mean_norm']:.3f}); " + "; ".join(parts) + "."
            )
    return out


def write_markdown(path: Path, data: dict[str, Any]) -> None:
    meta, results = data["meta"], data["results"]
    scalings = next(m["grid"]["scaling"] for m in meta["methods"] if "scaling" in m["grid"])
    reused = any(b.get("reused") for regime in meta["builds"].values() for b in regime.values())
    lines = [
        "# Fusion benchmark (issues 4 and 13)",
        "",
        "Generated by `benchmarks/fusion.py` (tables and findings alike)."
        + (" QUICK SMOKE RUN: too little training, the numbers mean nothing." if meta["quick"] else ""),
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"- machine: {meta['machine']}; torch threads: {meta['threads']}; load average at start {meta['loadavg']} "
        "(the 2 cores were shared with other agents' jobs)",
        f"- versions: {meta['versions']}",
        f"- total runtime {meta['total_seconds']:.0f} s (training: {meta['train_seconds']:.0f} s"
        + (" (cached models reused: pass --retrain)" if reused else "")
        + f", fusion incl. grids and repeats: {meta['fusion_seconds']:.0f} s, evaluation "
        f"({meta['evaluations']} model evaluations): {meta['eval_seconds']:.0f} s)",
        f"- C = `{meta['source']}`; RegMean's calibration text: `{meta['calibration']}` (unlabeled, no task data)",
        f"- fuse time: median of {meta['repeats']} runs of `fuse` / `fuse_adapters` with the chosen setting "
        "(reading, fusing, writing; RegMean includes its calibration pass; evaluation excluded)",
        "",
        "## Setup",
        "",
        "Tasks (ARC format, scored with lm-eval `arc_challenge` rules by `loraport.evaluate`):",
        "",
        "| task | kind | train | dev | eval | description |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in meta["tasks"].items():
        lines.append(f"| {name} | {t['kind']} | {t['n_train']} | {t['n_dev']} | {t['n_eval']} | {t['description']} |")
    lines += [
        "",
        "Inputs (cached under the work directory):",
        "",
        "| regime | task | recipe | training | relative weight change vs C |",
        "|---|---|---|---|---|",
    ]
    for regime in ("full", "lora"):
        for task, b in meta["builds"][regime].items():
            r = meta["recipes"][regime][task]
            recipe = (
                f"{'LoRA r=16 alpha=32, ' if r['lora'] else 'all weights, '}{r['steps']} steps, lr {r['lr']:g}, "
                f"wd {r['weight_decay']:g}" + (f", dropout {r['dropout']:g}" if r["dropout"] else "")
            )
            drift = _num(b.get("drift_projections")) + " (projections)"
            if b.get("drift_all_weights") is not None:
                drift += f", {_num(b['drift_all_weights'])} (all weights)"
            lines.append(
                f"| {regime} | {task} | {recipe} | {b['train_seconds']:.0f} s, final loss {b['final_loss']:.3f} | "
                f"{drift} |"
            )
    lines += [
        "",
        "Methods: every row runs through `loraport.fusion.fuse` (models) or `fuse_adapters` (adapters, Core "
        "Space; output rank = the sum of the input ranks unless the row says rank 16) with default options "
        "otherwise: every 2-D weight except the embeddings and the output head goes through the method, the "
        "rest is averaged, bit-identical tensors are copied; the *all tensors* rows (full regime: the fine-tunes "
        "changed the embeddings and the head too) send every tensor through the method (`include='.', "
        "exclude=''`). Task-vector methods use C as the base. RegMean (shrinkage 0.9) runs either the shipped "
        "generic calibration text through every model, or each model's own *task inputs*: the training "
        "questions of its task in the prompt format, without answers (the RegMean paper uses each model's "
        "unlabeled training inputs; for the memorised `facts` these are the evaluated questions themselves, "
        "never their answers). **Hyperparameters are chosen on the dev splits** (never the evaluation "
        "questions), by the worst task's gain kept, ties broken by the mean normalised accuracy: `scaling` in {"
        + ", ".join(f"{s:g}" for s in scalings)
        + "} for task arithmetic, TIES (and density in {0.2, 0.5}), DARE (keep probability 0.5, TIES sign "
        "election), TSV, Iso-C and Iso-CTS (common fraction 0.8); rgsp's gamma in {0, 0.25, 0.5, 0.75, 1} (the "
        "seed's gamma = 1 is a row of its own); RegMean's shrinkage in {0.5, 0.9, 1} (and, with task inputs, its "
        "fallback for the tensors it does not merge: average or task arithmetic at scaling 1); `average` has "
        "nothing to choose. "
        "*gain kept* = (acc - C) / (specialist - C) per task; *normalised acc* = acc / specialist, averaged over "
        "the merged tasks; *position on A->B* (two inputs) = <W* - W_A, W_B - W_A> / ||W_B - W_A||^2 averaged "
        "over the fused tensors (0 = A, 0.5 = average, 1 = B, 1.5 = past B). Each eval set has 200 questions: "
        "one standard error is at most 0.035, so differences under about 0.07 are noise.",
        "",
        "## Targets (issue 13)",
        "",
        *targets_table(results),
        "",
    ]
    for regime, merges in results.items():
        lines += [f"## {REGIME_NAMES[regime]}", ""]
        for merge, block in merges.items():
            lines += [f"### {merge}", "", *merge_table(block, regime), ""]
    lines += [
        "## rgsp: the seed's gamma and the gamma that serves best",
        "",
        "With gamma = 1 (seed 004) rgsp puts W* near (A + B)/2 + gamma (B - A), i.e. at position 1.5: past B, an "
        "extrapolation (the fusion report says so in a note). The gamma chosen on dev is in the next column.",
        "",
        *rgsp_table(results),
        "",
        "## Interference probe: how much of one LoRA the other task survives",
        "",
        "Not a method: C plus one LoRA in full and a fraction w of the other, scored on the evaluation "
        "questions. Every task-arithmetic-style merge of two updates is a point C + u dW_1 + v dW_2; when a small "
        "fraction of one update already wipes out the other task, such merges cannot keep both (the subspace "
        "methods and RegMean also change the directions; the tables above show whether that escapes it).",
        "",
        *probe_table(data.get("probe", [])),
        "",
        "## Cost: median fuse time (s) per method",
        "",
        *cost_table(results),
        "",
        "## Findings",
        "",
        *findings(results),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
