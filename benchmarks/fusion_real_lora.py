"""The LoRA part of the real fusion benchmark: four SmolLM2 LoRAs merged by every method and by PEFT.

Used by ``benchmarks/fusion_real.py`` (see its docstring). One process, one torch thread:

* The base model is loaded once; a merge is scored by adding its dense updates
  ``scaling * B A`` to the base's projections in place (restored after), so a merged
  adapter is scored exactly as PEFT would run it, without wrapping.
* Every method and PEFT combination type is linear in its scaling for equal weights
  (``W_C + s D``; PEFT's ``weights=[w] * N`` give ``w D``), so each is fused **once** per
  setting of its own (density) and the scaling is searched on the dev splits by rescaling.
* The search: scalings in :data:`SCALINGS`, from 1 up or down while the worst dev task's
  gain kept improves (ties broken by the mean). The chosen model alone is scored on the
  evaluation subset.
* Every score (per-question correctness) is cached in ``<work>/lora_scores.json``; a rerun
  scores only what is missing.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SCALINGS = (0.5, 1.0, 1.5, 2.0, 3.0)
# Ours: (row name, method, fixed settings). TIES at the paper's density and at 0.5.
OURS: list[tuple[str, str, dict[str, Any]]] = [
    ("task arithmetic", "task_arithmetic", {}),
    ("TIES d=0.2", "ties", {"density": 0.2}),
    ("DARE d=0.5", "dare", {"density": 0.5}),
    ("TSV", "tsv", {}),
    ("Iso-C", "iso_c", {}),
    ("Iso-CTS", "iso_cts", {}),
    ("RegMean (task inputs)", "regmean", {}),
]
# PEFT's add_weighted_adapter: (row name, combination_type, density). `cat` is task arithmetic (checked).
PEFT: list[tuple[str, str, float | None]] = [
    ("PEFT linear", "linear", None),
    ("PEFT cat", "cat", None),
    ("PEFT svd", "svd", None),
    ("PEFT ties d=0.2", "ties", 0.2),
    ("PEFT ties_svd d=0.2", "ties_svd", 0.2),
    ("PEFT dare_ties d=0.5", "dare_ties", 0.5),
    ("PEFT magnitude_prune d=0.2", "magnitude_prune", 0.2),
]
# Fusion by distillation: (row name, DistillOptions settings beside the defaults); run only when named.
DISTILLED: list[tuple[str, dict[str, Any]]] = [
    ("distill", {}),
    ("distill, patience 12", {"patience": 12}),  # memorised facts: held-out agreement cannot rise, the loss can
    ("distill, coefficients", {"learn": "coefficients"}),  # one weight per LoRA and layer (AdaMerging style)
    ("distill, 2026-12-07 evening defaults", {}),  # "distill" rerun: bfloat16 weights, best checkpoint by agreement
    ("distill, gap shares", {"task_shares": "gap"}),  # each step's batch split by each teacher's gap, not evenly
    # "distill, 2026-12-08 defaults" (its row in the results): run at commit 5ff44b9, whose stop rule (a record on
    # any one task is progress) was reverted after it; the evening's defaults otherwise.
    ("distill, 2026-12-08 rerun", {}),  # the defaults of 2026-12-08 night: the evening's and the side-effect bound
    ("distill, 2026-12-08 rerun, patience 8", {"patience": 8}),  # memorised facts: more checks without progress
]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (scale * B, A), float32


def say(text: str) -> None:
    import sys

    print(f"[fusion_real {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass
class Fused:
    """A merged adapter as dense-update factors, with what it cost."""

    factors: Factors
    seconds: float
    rank: int  # largest module rank
    params: int  # factor entries stored
    note: str = ""
    details: dict[str, Any] | None = None  # a distilled fusion's report: per-task agreement, perplexity, timings


def gain_kept(merged: list[float], base: list[float], specialist: list[float]) -> tuple[float, float]:
    """``(sum(m - c) / sum(s - c), standard error)`` over the same questions (delta method)."""
    n = len(merged)
    d = [m - c for m, c in zip(merged, base, strict=True)]
    g = [s - c for s, c in zip(specialist, base, strict=True)]
    mean_g = sum(g) / n
    if abs(mean_g) < 1e-12:
        return float("nan"), float("nan")
    ratio = sum(d) / sum(g)
    residual = [di - ratio * gi for di, gi in zip(d, g, strict=True)]
    mu = sum(residual) / n
    var = sum((r - mu) ** 2 for r in residual) / max(1, n - 1)
    return ratio, math.sqrt(var / n) / abs(mean_g)


class Scorer:
    """The base model with updates applied in place, scoring ARC subsets; every score cached."""

    def __init__(self, model_dir: Path, records: dict[tuple[str, str], list[dict]], cache_path: Path) -> None:
        from loraport.evaluate import load_model, load_tokenizer

        self.model = load_model(model_dir)
        self.model.eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.records = records
        self.original = {
            name: module.weight.detach().clone()
            for name, module in self.model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1].endswith("_proj")
        }
        self.cache_path = cache_path
        self.cache: dict[str, list[float]] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        self.seconds = 0.0

    def save(self) -> None:
        merge_json(self.cache_path, self.cache)

    @torch.no_grad()
    def _apply(self, factors: Factors | None, scaling: float) -> None:
        for name, weight in self.original.items():
            target = self.model.get_submodule(name).weight
            if factors is not None and name in factors:
                B, A = factors[name]
                target.copy_(weight + scaling * (B @ A))
            else:
                target.copy_(weight)

    def score(self, key: str, factors: Factors | None, scaling: float, task: str, split: str) -> list[float]:
        """Per-question correctness of the base plus ``scaling * factors`` on ``task``'s ``split`` subset."""
        full = score_key(key, scaling, task, split)
        if full not in self.cache:
            from loraport.pretrained.scoring import correct, shared_context_scores

            started = time.perf_counter()
            self._apply(factors, scaling)
            records = self.records[(task, split)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.cache[full] = correct(records, shared_context_scores(self.model, self.tokenizer, records))
            self._apply(None, 0.0)
            self.seconds += time.perf_counter() - started
            self.save()
        return self.cache[full]


def score_key(key: str, scaling: float, task: str, split: str) -> str:
    """The score cache's key of one merge (``key``: ``base``, ``lora-<task>`` or ``<merge>|<row>``) at one scaling."""
    return f"{key}|s={scaling:g}|{task}|{split}"


def reference_accuracies(scores: dict[str, list[float]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """``{"<task>|<split>": {"base", "specialist", "n"}}``: the base's and each task's own LoRA's accuracy."""
    out = {}
    for t in tasks:
        for split in ("dev", "eval"):
            base, own = scores[score_key("base", 0.0, t, split)], scores[score_key(f"lora-{t}", 1.0, t, split)]
            out[f"{t}|{split}"] = {"base": sum(base) / len(base), "specialist": sum(own) / len(own), "n": len(base)}
    return out


def merge_json(path: Path, entries: dict[str, Any]) -> None:
    """Write ``entries`` over what ``path`` holds (other processes may add entries to the same file)."""
    from loraport.io import atomic_write_text

    on_disk = json.loads(path.read_text()) if path.exists() else {}
    entries.update({k: v for k, v in on_disk.items() if k not in entries})
    atomic_write_text(path, json.dumps(entries, indent=1))


def adapter_factors(adapter: Any) -> Factors:
    return {n: (m.B.float() * m.scale, m.A.float()) for n, m in adapter.modules.items()}


def stats(factors: Factors) -> tuple[int, int]:
    return max(int(A.shape[0]) for _, A in factors.values()), sum(B.numel() + A.numel() for B, A in factors.values())


def fuse_ours(adapters: list[Any], method: str, settings: dict[str, Any], base: Path, calib: list[Path]) -> Fused:
    from loraport.fusion import fuse_adapters

    extra: dict[str, Any] = dict(settings)
    if method == "regmean":
        extra.update(model_calibration=[str(p) for p in calib])
    started = time.perf_counter()
    result = fuse_adapters(
        adapters[0], adapters[1], None, more=adapters[2:], method=method, base=str(base), progress=False, **extra
    )
    seconds = time.perf_counter() - started
    factors = adapter_factors(result.adapter)
    rank, params = stats(factors)
    return Fused(factors, seconds, rank, params)


@dataclass
class DistillInputs:
    """What a fusion by distillation (row ``distill``) needs beyond the loaded adapters."""

    loras: dict[str, Path]  # task -> its LoRA's directory
    prompts: dict[str, Path]  # task -> its training questions (ARC JSONL: the answers are never read)
    out: Path  # the fused adapters and the teachers' cache go under it
    seconds: float | None = None  # the student's training-time limit


def fuse_distill(
    tasks: tuple[str, ...], merge: str, base: Path, inputs: DistillInputs, row: str = "distill", **settings: Any
) -> Fused:
    """``loraport.fuse(method="distill")`` (default settings but ``settings``): each LoRA a teacher on its
    training questions; the fused adapter under ``inputs.out/<merge>/<row>``."""
    from loraport import fuse
    from loraport.distill import DistillOptions

    out = inputs.out / merge.replace("+", "-").replace(" ", "-") / row.replace(", ", "-").replace(" ", "-")
    paths = [str(inputs.loras[t]) for t in tasks]
    options = DistillOptions(cache=str(inputs.out / "teachers"), time=inputs.seconds, **settings)
    started = time.perf_counter()
    result = fuse(paths[0], paths[1], str(out), more=paths[2:], method="distill", bases=[str(base)],
                  prompts=[str(inputs.prompts[t]) for t in tasks], distill=options, overwrite=True,
                  progress=False)  # fmt: skip
    seconds = time.perf_counter() - started
    factors = adapter_factors(result.adapter)
    rank, params = stats(factors)
    info = result.report.distill or {}
    details = {
        "chosen": info.get("chosen"),
        "agreement": {  # held-out agreement with each teacher: [start merge, distilled]
            t: [found["start"]["agreement"], found["distilled"]["agreement"]]
            for t, found in zip(tasks, info.get("tasks", []), strict=False)
        },
        "generic": info.get("generic"),
        "student": {k: v for k, v in (info.get("student") or {}).items() if k != "modules"},
        "timings": info.get("timings"),
        "peak_rss_mb": result.report.peak_rss_mb,
        "notes": result.report.notes,
    }
    return Fused(factors, seconds, rank, params, f"chosen: {info.get('chosen')}", details)


class PeftMerger:
    """PEFT's ``add_weighted_adapter`` on a model holding the four LoRAs (loaded once)."""

    def __init__(self, model_dir: Path, loras: dict[str, Path]) -> None:
        from peft import PeftModel

        from loraport.evaluate import load_model

        names = list(loras)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = PeftModel.from_pretrained(load_model(model_dir), str(loras[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                self.model.load_adapter(str(loras[name]), adapter_name=name)

    def fuse(self, tasks: tuple[str, ...], combination: str, density: float | None) -> Fused:
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(0)  # DARE's masks
        name = "merged"
        started = time.perf_counter()
        kwargs: dict[str, Any] = {"density": density} if density is not None else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.add_weighted_adapter(list(tasks), [1.0] * len(tasks), name, combination, **kwargs)
        seconds = time.perf_counter() - started
        factors: Factors = {}
        prefix = "base_model.model."
        for module_name, layer in self.model.named_modules():
            if isinstance(layer, LoraLayer) and name in layer.lora_A:
                A = layer.lora_A[name].weight.detach().float().clone()
                B = layer.lora_B[name].weight.detach().float().clone() * layer.scaling[name]
                factors[module_name.removeprefix(prefix)] = (B, A)
        self.model.delete_adapter(name)
        rank, params = stats(factors)
        return Fused(factors, seconds, rank, params)


def max_update_difference(a: Factors, b: Factors) -> float:
    """``max |D_a - D_b| / max |D_a|`` over modules (dense products)."""
    worst = 0.0
    for name, (B, A) in a.items():
        Bb, Ab = b[name]
        D = B.double() @ A.double()
        worst = max(worst, float((D - Bb.double() @ Ab.double()).abs().max() / D.abs().max()))
    return worst


def choose_scaling(dev_score: Callable[[float], tuple[float, float]], start: float = 1.0) -> tuple[float, list]:
    """Hill-climb over :data:`SCALINGS` from ``start`` by the dev score ``(worst, mean)``; returns (best, tried)."""
    index = SCALINGS.index(start)
    tried: dict[float, tuple[float, float]] = {}

    def at(i: int) -> tuple[float, float]:
        s = SCALINGS[i]
        if s not in tried:
            tried[s] = dev_score(s)
        return tried[s]

    best = index
    for step in (1, -1):
        i = index
        while 0 <= i + step < len(SCALINGS) and at(i + step) > at(best):
            i += step
            best = i
        if best != index:
            break
    return SCALINGS[best], sorted(tried.items())


def run_merges(
    scorer: Scorer,
    adapters: dict[str, Any],
    peft: PeftMerger,
    merges: dict[str, tuple[str, ...]],
    base_dir: Path,
    calib: dict[str, Path],
    rows_path: Path,
    methods: list[str] | None = None,
    distill: DistillInputs | None = None,
) -> dict[str, Any]:
    """Every method on every merge: dev search, evaluation, cost; rows cached in ``rows_path``.

    The ``distill`` row (a fusion by distillation, minutes each) runs only when ``methods`` names it.
    """
    rows: dict[str, Any] = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    tasks_all = sorted({t for m in merges.values() for t in m})
    reference = {
        (t, split): (
            scorer.score("base", None, 0.0, t, split),
            scorer.score(f"lora-{t}", adapter_factors(adapters[t]), 1.0, t, split),
        )
        for t in tasks_all
        for split in ("dev", "eval")
    }
    for merge, tasks in merges.items():
        fused_ta: Fused | None = None
        candidates = [(r, "ours", m, s) for r, m, s in OURS] + [(r, "peft", c, d) for r, c, d in PEFT]
        candidates += [(r, "distill", None, settings) for r, settings in DISTILLED]
        for row, kind, *spec in candidates:
            if (methods is None and kind == "distill") or (methods is not None and row not in methods):
                continue
            key = f"{merge}|{row}"
            if rows_path.exists():  # another process may have done it meanwhile
                rows.update({k: v for k, v in json.loads(rows_path.read_text()).items() if k not in rows})
            if key in rows:
                continue
            say(f"{merge}: {row} ...")
            if kind == "distill":
                if distill is None:
                    raise ValueError("the distill row needs its inputs (DistillInputs)")
                fused = fuse_distill(tasks, merge, base_dir, distill, row, **spec[1])
            elif kind == "ours":
                method, settings = spec
                fused = fuse_ours([adapters[t] for t in tasks], method, settings, base_dir, [calib[t] for t in tasks])
            else:
                combination, density = spec
                fused = peft.fuse(tasks, combination, density)
            if row == "task arithmetic":
                fused_ta = fused
            score_key = key
            if row == "PEFT cat":
                if fused_ta is None:
                    fused_ta = fuse_ours([adapters[t] for t in tasks], "task_arithmetic", {}, base_dir, [])
                difference = max_update_difference(fused_ta.factors, fused.factors)
                fused.note = f"= task arithmetic, max relative update difference {difference:.1e}"
                score_key = f"{merge}|task arithmetic"

            def dev(
                s: float, fused: Fused = fused, score_key: str = score_key, tasks: tuple = tasks
            ) -> tuple[float, float]:
                kept = [
                    gain_kept(scorer.score(score_key, fused.factors, s, t, "dev"), *reference[(t, "dev")])[0]
                    for t in tasks
                ]
                return min(kept), sum(kept) / len(kept)

            scalable = kind == "peft" or (kind == "ours" and spec[0] != "regmean")  # a student is used as trained
            scaling, tried = choose_scaling(dev) if scalable else (1.0, [(1.0, dev(1.0))])
            evaluated = {}
            for t in tasks:
                merged = scorer.score(score_key, fused.factors, scaling, t, "eval")
                value, se = gain_kept(merged, *reference[(t, "eval")])
                evaluated[t] = {"gain_kept": value, "se": se, "acc": sum(merged) / len(merged)}
            rows[key] = {
                "merge": merge,
                "row": row,
                "kind": kind,
                "scaling": scaling,
                "dev_tried": tried,
                "eval": evaluated,
                "fuse_seconds": fused.seconds,
                "rank": fused.rank,
                "params": fused.params,
                "note": fused.note,
                **({"details": fused.details} if fused.details else {}),
            }
            merge_json(rows_path, rows)
            worst = min(v["gain_kept"] for v in evaluated.values())
            say(
                f"{merge}: {row} scaling {scaling:g}: worst gain kept {worst:.2f}; scored {scorer.seconds:.0f} s so far"
            )
    rows = {k: v for k, v in rows.items() if v["merge"] in merges}
    return {"rows": rows, "references": reference_accuracies(scorer.cache, tasks_all)}


def pairs_and_all(tasks: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Every pair, every triple (run when asked for: ``--merges facts+bins+smallest``) and all of them."""
    merges = {"+".join(c): c for n in (2, 3) for c in itertools.combinations(tasks, n)}
    merges["all four"] = tasks
    return merges
