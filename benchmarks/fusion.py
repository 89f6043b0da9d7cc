"""Fusion benchmark (issues 4 and 13, SPEC sec. 7 and 12): every method on two task pairs and a three-model merge.

    python benchmarks/fusion.py                  # writes benchmarks/results/fusion.md (about 25 min on 1 busy core)
    python benchmarks/fusion.py --retrain        # retrain the cached fine-tunes and LoRAs
    python benchmarks/fusion.py --quick          # smoke run (tiny training, few questions, small grids)
    python benchmarks/fusion.py --report-only    # rewrite the Markdown from <work>/results.json

C is the zoo's source model S (the shipped demo copy by default, ``--source`` for another). Three
tasks (:mod:`loraport.zoo.tasks`, each with a dev split that neither training nor the reported
evaluation uses): ``facts`` (memorised), ``addition`` and ``smaller`` (held-out skills). Per task,
in three regimes:

* ``full``: every weight of C fine-tuned on the task (embeddings and head included);
* ``lora``: a PEFT LoRA (r=16, all seven projections) trained on C, merged into C (dense models);
* ``adapter``: the same LoRAs fused as adapters (:func:`loraport.fusion.fuse_adapters`, Core Space).

Merges: ``facts+addition`` (the existing pair), ``addition+smaller`` (a second pair: two skills)
and ``all three``. Every method runs through the public API. A method's hyperparameter (the
task-vector ``scaling``; TIES' density; rgsp's gamma) is chosen on the **dev** splits of the
merged tasks, by the worst task's gain kept (ties broken by the mean normalised accuracy), and
only the chosen model is scored on the evaluation questions. Fuse time is the median of
``--repeats`` runs of the chosen configuration (fusion only, evaluation excluded).

Everything trained is cached under the work directory (``--retrain`` redoes it); all numbers
go to ``<work>/results.json`` and :mod:`fusion_report` writes the Markdown.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_report import gain_kept, normalised, write_markdown

SEED = 0
TASK_NAMES = ("facts", "addition", "smaller")
MERGES = {"facts+addition": ("facts", "addition"), "addition+smaller": ("addition", "smaller")}
MERGES["all three"] = TASK_NAMES
REGIMES = ("full", "lora", "adapter")
SCALINGS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)
FALLBACKS = ("average", "task_arithmetic")
SHRINKAGES = (0.5, 0.9, 1.0)
PROBE_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
ALL_TENSORS = {"include": ".", "exclude": ""}


@dataclass
class Recipe:
    """One training run: full fine-tune of every weight, or a LoRA (``lora=True``)."""

    steps: int
    lr: float
    weight_decay: float = 0.1
    dropout: float = 0.0
    lora: bool = False
    batch_size: int = 32
    warmup: int = 20
    clip: float = 1.0
    seed: int = SEED


FULL = {"facts": Recipe(300, 1e-3), "addition": Recipe(1000, 1e-3), "smaller": Recipe(400, 1e-3)}
LORA = {
    "facts": Recipe(400, 3e-3, weight_decay=0.0, lora=True),
    "addition": Recipe(1000, 5e-3, weight_decay=0.1, dropout=0.2, lora=True),
    "smaller": Recipe(400, 3e-3, weight_decay=0.0, lora=True),
}
QUICK = {name: Recipe(8, 1e-3) for name in TASK_NAMES}
QUICK_LORA = {name: Recipe(8, 3e-3, lora=True) for name in TASK_NAMES}


@dataclass
class Method:
    """A benchmark row: a fusion method, fixed options, and a grid chosen on the dev split."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    regimes: tuple[str, ...] = REGIMES
    rank: int | None = None  # adapters: output rank (default: the sum of the input ranks)

    def candidates(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())] or [{}]


METHODS = [
    Method("rgsp gamma=1 (seed)", "rgsp", {"gamma": 1.0}),
    Method("rgsp, gamma on dev", "rgsp", grid={"gamma": GAMMAS}),
    Method("average", "average"),
    Method("task_arithmetic", "task_arithmetic", grid={"scaling": SCALINGS}),
    Method("ties", "ties", grid={"density": (0.2, 0.5), "scaling": SCALINGS}),
    Method("dare (p=0.5, ties)", "dare", {"density": 0.5, "combine": "ties"}, grid={"scaling": SCALINGS}),
    Method("tsv", "tsv", grid={"scaling": SCALINGS}),
    Method("iso_c", "iso_c", grid={"scaling": SCALINGS}),
    Method("iso_cts", "iso_cts", grid={"scaling": SCALINGS}),
    Method("regmean (generic text)", "regmean", {"calibration": "generic"}, grid={"shrinkage": SHRINKAGES}),
    Method(
        "regmean (task inputs)", "regmean", {"calibration": "task"}, {"shrinkage": SHRINKAGES, "fallback": FALLBACKS}
    ),
    # Full fine-tunes also change the embeddings and the head, which the default selection averages.
    Method("task_arithmetic, all tensors", "task_arithmetic", ALL_TENSORS, {"scaling": SCALINGS}, ("full",)),
    Method("ties, all tensors", "ties", ALL_TENSORS, {"density": (0.2, 0.5), "scaling": SCALINGS}, ("full",)),
    Method("tsv, all tensors", "tsv", ALL_TENSORS, {"scaling": SCALINGS}, ("full",)),
    Method("task_arithmetic, rank 16", "task_arithmetic", grid={"scaling": SCALINGS}, regimes=("adapter",), rank=16),
    Method("iso_cts, rank 16", "iso_cts", grid={"scaling": SCALINGS}, regimes=("adapter",), rank=16),
]


def log(text: str) -> None:
    print(f"[fusion {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- tasks and inputs ----------------------------------------------------------------------------


def build_tasks(quick: bool) -> dict[str, Any]:
    from loraport.zoo.tasks import addition_task, facts_task, smaller_task

    if quick:
        return {
            "facts": facts_task(SEED, people=12, n_dev=8),
            "addition": addition_task(SEED, max_operand=9, n_eval=20, n_dev=10),
            "smaller": smaller_task(SEED, n_train=40, n_dev=10, n_eval=20),
        }
    return {
        "facts": facts_task(SEED, people=60, n_dev=40),
        "addition": addition_task(SEED, max_operand=29, n_dev=100),
        "smaller": smaller_task(SEED),
    }


def train(source: Path, items: list[tuple[str, str]], recipe: Recipe, out: Path) -> dict[str, Any]:
    """Full fine-tune or LoRA of ``source`` on QA items; saves the model (or adapter) and tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraport.zoo.train import LoraRecipe, collate_qa, projection_weights, qa_examples, relative_drift, train_lora

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    projections = {n: p.detach().clone() for n, p in projection_weights(model).items()}
    started = time.perf_counter()
    if recipe.lora:
        lora_recipe = LoraRecipe(
            steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay, dropout=recipe.dropout
        )
        peft_model, result = train_lora(model, tokenizer, items, lora_recipe, recipe.seed)
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out))
        return {"steps": recipe.steps, "train_seconds": result.seconds, "final_loss": result.final_loss}
    source_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = qa_examples(tokenizer, items)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    order: list[int] = []
    running = math.nan
    for step in range(recipe.steps):
        warm = (step + 1) / recipe.warmup
        cosine = 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)))
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * (warm if step < recipe.warmup else cosine)
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
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    weights = {n: p.detach() for n, p in model.named_parameters()}
    return {
        "steps": recipe.steps,
        "train_seconds": time.perf_counter() - started,
        "final_loss": running,
        "drift_all_weights": relative_drift(weights, source_weights)["all"],
        "drift_projections": relative_drift(weights, projections)["all"],
    }


def merge_lora(source: Path, lora: Path, out: Path) -> dict[str, Any]:
    """``PeftModel.from_pretrained(C, lora).merge_and_unload()`` saved with the tokenizer (float32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraport.zoo.train import projection_weights, relative_drift

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    projections = {n: p.detach().clone() for n, p in projection_weights(model).items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = PeftModel.from_pretrained(model, str(lora)).merge_and_unload()
    merged.eval()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"drift_projections": relative_drift(merged, projections)["all"]}


def build_inputs(source: Path, tasks: dict[str, Any], work: Path, quick: bool, retrain: bool) -> dict[str, Any]:
    """Per task: the full fine-tune, the LoRA and the LoRA merged into C, cached under ``work/models``."""
    from loraport.zoo.tasks import answer_text

    full, lora = (QUICK, QUICK_LORA) if quick else (FULL, LORA)
    info: dict[str, dict[str, Any]] = {"full": {}, "lora": {}}
    paths: dict[str, dict[str, Path]] = {"full": {}, "lora": {}, "adapter": {}}
    for task_name, task in tasks.items():
        items = [(r["question"], answer_text(r)) for r in task.train]
        for regime, recipe in (("full", full[task_name]), ("lora", lora[task_name])):
            out = work / "models" / f"{regime}-{task_name}"
            meta = out / "fusion_bench.json"
            wanted = {"recipe": asdict(recipe), "source": str(source), "n_train": len(items)}
            if not retrain and meta.is_file() and json.loads(meta.read_text())["wanted"] == wanted:
                built = json.loads(meta.read_text())["info"]
                built["reused"] = True
                log(f"{regime} {task_name}: reusing {out}")
            else:
                log(f"{regime} {task_name}: training {recipe.steps} steps")
                shutil.rmtree(out, ignore_errors=True)
                built = train(source, items, recipe, out)
                meta.write_text(json.dumps({"wanted": wanted, "info": built}, indent=2))
                built["reused"] = False
            info[regime][task_name] = built
            if regime == "full":
                paths["full"][task_name] = out
            else:
                paths["adapter"][task_name] = out
                merged = work / "models" / f"lora-merged-{task_name}"
                built.update(merge_lora(source, out, merged))
                paths["lora"][task_name] = merged
    return {"info": info, "paths": paths}


# -- scoring -------------------------------------------------------------------------------------


class Scorer:
    """Accuracy of a model directory (optionally + adapter) on tasks' dev or eval questions."""

    def __init__(self, tasks: dict[str, Any]) -> None:
        self.sets = {"dev": {n: t.dev for n, t in tasks.items()}, "eval": {n: t.eval for n, t in tasks.items()}}
        self.seconds = 0.0
        self.calls = 0

    def __call__(
        self, model_dir: Path, names: tuple[str, ...], split: str, adapter: Path | None = None
    ) -> dict[str, dict[str, float]]:
        from loraport.evaluate import evaluate, load_model, load_tokenizer

        started = time.perf_counter()
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, adapter)
        scores = {}
        for name in names:
            result = evaluate(model, tokenizer, self.sets[split][name], batch_size=64, progress=False)
            scores[name] = {"acc": result.acc, "acc_norm": result.acc_norm, "n": result.n}
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return scores


def selection_key(scores: dict[str, dict[str, float]], refs: dict[str, Any]) -> tuple[float, float]:
    """``(worst task's gain kept, mean normalised accuracy)`` on the dev split: larger is better."""
    gains = [gain_kept(scores[t]["acc"], refs["C"][t], refs["spec"][t]) for t in scores]
    norms = [normalised(scores[t]["acc"], refs["spec"][t]) for t in scores]
    return (min(gains), statistics.fmean(norms))


# -- fusion ---------------------------------------------------------------------------------------


def run_fusion(
    method: Method,
    params: dict[str, Any],
    regime: str,
    names: tuple[str, ...],
    inputs: list[Path],
    out: Path,
    ctx: dict[str, Any],
) -> Any:
    from loraport.fusion import fuse, fuse_adapters

    options = {**method.options, **params}
    if options.get("calibration") == "task":  # each model's own unlabeled task questions (RegMean's setting)
        options["model_calibration"] = [ctx["task_text"][t] for t in names]
        del options["calibration"]
    elif options.get("calibration") == "generic":  # one generic text for every model
        options["calibration"] = ctx["calibration"]
    common = dict(method=method.method, overwrite=True, progress=False, more=inputs[2:], **options)
    if regime == "adapter":
        base = ctx["source"] if method.method == "regmean" else None
        return fuse_adapters(inputs[0], inputs[1], out, rank=method.rank, base=base, **common)
    uses_base = method.method in ctx["needs_base"] or options.get("fallback") == "task_arithmetic"
    return fuse(inputs[0], inputs[1], out, base=ctx["source"] if uses_base else None, **common)


def score_fused(regime: str, out: Path, names: tuple[str, ...], split: str, ctx: dict[str, Any]) -> Any:
    score: Scorer = ctx["score"]
    if regime == "adapter":
        return score(ctx["source"], names, split, adapter=out)
    return score(out, names, split)


def run_method(method: Method, regime: str, merge: str, ctx: dict[str, Any], refs: dict[str, Any]) -> dict[str, Any]:
    names = MERGES[merge]
    inputs = [ctx["paths"][regime][t] for t in names]
    out = ctx["work"] / "fused" / regime / "candidate"
    grid = []
    best: tuple[tuple[float, float], dict[str, Any]] | None = None
    candidates = method.candidates()
    for params in candidates:
        run_fusion(method, params, regime, names, inputs, out, ctx)
        if len(candidates) == 1:
            break  # nothing to choose: no dev evaluation needed
        dev = score_fused(regime, out, names, "dev", ctx)
        key = selection_key(dev, refs["dev"])
        grid.append({"params": params, "dev": dev, "key": key})
        if best is None or key > best[0]:
            best = (key, params)
    chosen = best[1] if best is not None else candidates[0]
    times = []
    result = None
    for _ in range(ctx["repeats"]):
        started = time.perf_counter()
        result = run_fusion(method, chosen, regime, names, inputs, out, ctx)
        times.append(time.perf_counter() - started)
    assert result is not None
    scores = score_fused(regime, out, names, "eval", ctx)
    totals = result.report.totals()
    row = {
        "label": method.label,
        "method": method.method,
        "options": method.options,
        "rank": method.rank,
        "chosen": chosen,
        "grid": grid,
        "scores": scores,
        "fuse_seconds": statistics.median(times),
        "fuse_times": times,
        "mean_position": totals["mean_position"],
        "max_dropped_energy": totals["max_dropped_energy"],
        "actions": totals["actions"],
        "notes": [n for n in result.report.notes if n.startswith(("extrapolation:", "regmean:"))],
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def reference_scores(regime: str, names: tuple[str, ...], split: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """C's and each specialist's accuracy on its own task, for gains and normalised accuracies."""
    cache: dict[tuple[str, str], Any] = ctx["ref_cache"]
    key_c = ("C", split)
    if key_c not in cache:
        cache[key_c] = ctx["score"](ctx["source"], TASK_NAMES, split)
    specs = {}
    for task in names:
        key = (f"{regime}:{task}", split)
        if key not in cache:
            path = ctx["paths"][regime][task]
            cache[key] = (
                ctx["score"](ctx["source"], TASK_NAMES, split, adapter=path)
                if regime == "adapter"
                else ctx["score"](path, TASK_NAMES, split)
            )
        specs[task] = cache[key]
    return {
        "C": {t: cache[key_c][t]["acc"] for t in names},
        "spec": {t: specs[t][t]["acc"] for t in names},
        "specialists": specs,
        "C_scores": cache[key_c],
    }


def run_all(ctx: dict[str, Any], methods: list[Method]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for regime in REGIMES:
        results[regime] = {}
        for merge, names in MERGES.items():
            refs = {split: reference_scores(regime, names, split, ctx) for split in ("dev", "eval")}
            rows = []
            for method in methods:
                if regime not in method.regimes or (method.method == "rgsp" and len(names) > 2):
                    continue
                row = run_method(method, regime, merge, ctx, refs)
                rows.append(row)
                brief = ", ".join(f"{t} {row['scores'][t]['acc']:.3f}" for t in names)
                log(f"{regime} {merge}: {method.label} {row['chosen']}: {brief} ({row['fuse_seconds']:.2f} s)")
            results[regime][merge] = {"tasks": names, "refs": refs["eval"], "dev_refs": refs["dev"], "rows": rows}
    return results


def interference_probe(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """``C + dW_1 + w dW_2`` for the LoRA pairs: how much of one LoRA the other's task survives (eval questions).

    Not a fusion method: a diagnostic of the LoRA regime. Every linear merge of two updates is a
    point ``C + u dW_1 + v dW_2``; if a fraction of the second update already wipes out the first
    task, no weight-space merge can keep both.
    """
    import torch

    from loraport.adapters import load_adapter
    from loraport.evaluate import evaluate, load_model, load_tokenizer

    started = time.perf_counter()
    score: Scorer = ctx["score"]
    tokenizer = load_tokenizer(ctx["source"])
    model = load_model(ctx["source"])
    base = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    deltas = {
        task: {f"{n}.weight": m.delta(torch.float32) for n, m in load_adapter(path).modules.items()}
        for task, path in ctx["paths"]["adapter"].items()
    }
    rows = []
    for merge, names in MERGES.items():
        if len(names) != 2:
            continue
        for first, second in (names, names[::-1]):
            for weight in PROBE_WEIGHTS:
                state = {k: v.clone() for k, v in base.items()}
                for key, delta in deltas[first].items():
                    state[key] += delta
                for key, delta in deltas[second].items():
                    state[key] += weight * delta
                model.load_state_dict(state)
                accs = {
                    t: evaluate(model, tokenizer, score.sets["eval"][t], batch_size=64, progress=False).acc
                    for t in names
                }
                rows.append({"merge": merge, "full": first, "added": second, "weight": weight, "acc": accs})
    score.seconds += time.perf_counter() - started
    return rows


# -- main -----------------------------------------------------------------------------------------


def _versions() -> str:
    import ot
    import peft
    import torch
    import transformers

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, POT {ot.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None, help="the base model C (default: the shipped demo zoo's S)")
    parser.add_argument("--calibration", default=None, help="RegMean's text (default: the demo zoo's calibration)")
    parser.add_argument("--work", default=None, help="work directory (default benchmarks/work/fusion[-quick])")
    parser.add_argument("--out", default=None, help="Markdown result (default benchmarks/results/fusion.md)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a loaded 2-core machine)")
    parser.add_argument("--repeats", type=int, default=None, help="timed fuse runs of the chosen setting (3)")
    parser.add_argument("--retrain", action="store_true", help="retrain the cached fine-tunes and LoRAs")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny training, few questions, 1 repeat")
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown from results.json")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from loraport.zoo import demo_dir

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    quick = args.quick
    work = Path(args.work or ("benchmarks/work/fusion-quick" if quick else "benchmarks/work/fusion"))
    out = Path(args.out or (work / "fusion.md" if quick else "benchmarks/results/fusion.md"))
    if args.report_only:
        write_markdown(out, json.loads((work / "results.json").read_text(encoding="utf-8")))
        log(f"rewrote {out} from {work / 'results.json'}")
        return 0
    source = Path(args.source) if args.source else demo_dir() / "models" / "S"
    calibration = Path(args.calibration) if args.calibration else demo_dir() / "calibration.txt"
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    tasks = build_tasks(quick)
    task_text = {}
    for name, task in tasks.items():
        task.write(work / "tasks" / name)
        # RegMean's "task inputs": the training questions in the prompt format, without answers.
        task_text[name] = work / "tasks" / name / "unlabeled.txt"
        task_text[name].write_text("".join(f"Question: {r['question']} Answer:\n" for r in task.train))
    t0 = time.perf_counter()
    inputs = build_inputs(source, tasks, work, quick, args.retrain)
    train_seconds = time.perf_counter() - t0
    score = Scorer(tasks)
    from loraport.fusion import FUSION_METHODS

    ctx = {
        "work": work,
        "source": source,
        "calibration": calibration,
        "task_text": task_text,
        "paths": inputs["paths"],
        "score": score,
        "repeats": args.repeats or (1 if quick else 3),
        "needs_base": {name for name, m in FUSION_METHODS.items() if m.needs_base},
        "ref_cache": {},
    }
    methods = METHODS
    if quick:
        methods = [replace(m, grid={k: v[:2] for k, v in m.grid.items()}) for m in METHODS]
    fuse_started = time.perf_counter()
    results = run_all(ctx, methods)
    fusion_seconds = time.perf_counter() - fuse_started - score.seconds
    probe = interference_probe(ctx)
    command = shlex.join(["python", "benchmarks/fusion.py", *(sys.argv[1:] if argv is None else argv)])
    data = {
        "meta": {
            "command": command,
            "quick": quick,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
            "threads": args.threads,
            "loadavg": loadavg,
            "versions": _versions(),
            "repeats": ctx["repeats"],
            "source": str(source),
            "calibration": str(calibration),
            "tasks": {
                n: {
                    "description": t.description,
                    "kind": t.kind,
                    "n_train": len(t.train),
                    "n_dev": len(t.dev),
                    "n_eval": len(t.eval),
                }
                for n, t in tasks.items()
            },
            "recipes": {
                "full": {n: asdict(r) for n, r in (QUICK if quick else FULL).items()},
                "lora": {n: asdict(r) for n, r in (QUICK_LORA if quick else LORA).items()},
            },
            "builds": inputs["info"],
            "methods": [asdict(m) for m in methods],
            "train_seconds": train_seconds,
            "fusion_seconds": fusion_seconds,
            "eval_seconds": score.seconds,
            "evaluations": score.calls,
            "total_seconds": time.perf_counter() - started,
        },
        "results": results,
        "probe": probe,
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(data, indent=2, default=str))
    write_markdown(out, data)
    log(f"wrote {out} and {work / 'results.json'} in {data['meta']['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
