"""Build the quality zoo: tiny pretrained LMs, drifted derivatives, tasks, LoRAs, manifest.

What gets built (SPEC sec. 8), under ``out_dir``::

    manifest.json            everything below, with measured numbers
    tokenizer/               the word-level tokenizer (also saved beside every model)
    models/S, I, X           pretrained on the procedural corpus (S, I: Llama; X: Gemma2, other width/depth)
    models/D5, D15, D30      S continued on a shifted corpus, saved when the projection drift
                             ||W_D - W_S||_F / ||W_S||_F first reaches 5%, 15%, 30%
    tasks/<task>/            train.jsonl, eval.jsonl (ARC format)
    loras/<base>-<task>/     PEFT LoRA r=16, alpha=32, all seven projections: on S (the source)
                             and, with the same recipe, on every target (the oracles)
    calibration.txt          unlabeled generic sentences (other seed, no task data)

Jobs run in ``workers`` processes (spawned, one thread each: on a shared 2-core machine
two single-threaded processes beat one two-threaded process by far), in dependency order.
Every job is seeded; the same config gives the same files on the same machine.

Example::

    >>> from loraport.zoo import build_zoo, load_manifest
    >>> build_zoo("benchmarks/work/zoo")                         # doctest: +SKIP
    >>> load_manifest("benchmarks/work/zoo").lora_path("S", "facts")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .train import LoraRecipe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ModelSpec:
    """A pretrained model of the zoo: shape, seed and pretraining schedule."""

    arch: str  # transformers model_type: "llama", "gemma2", ...
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seed: int
    steps: int
    lr: float
    head_dim: int | None = None
    batch_size: int = 32
    seq_len: int = 64
    warmup: int = 50

    def shape(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim or self.hidden // self.heads,
            "intermediate": self.intermediate,
        }


@dataclass
class DerivativeSpec:
    """Continued training of ``parent`` on the shifted corpus; a snapshot at each drift target."""

    parent: str = "S"
    targets: dict[str, float] = field(default_factory=lambda: {"D5": 0.05, "D15": 0.15, "D30": 0.30})
    lr: float = 1.5e-3
    warmup: int = 20
    max_steps: int = 1500
    seed: int = 5
    batch_size: int = 32
    seq_len: int = 64


@dataclass
class ZooConfig:
    """Everything that decides the zoo's contents (recorded in the manifest)."""

    models: dict[str, ModelSpec] = field(
        default_factory=lambda: {
            "S": ModelSpec("llama", 128, 4, 4, 2, 320, seed=0, steps=600, lr=3e-3),
            "I": ModelSpec("llama", 128, 4, 4, 2, 320, seed=1, steps=600, lr=3e-3),
            "X": ModelSpec("gemma2", 192, 6, 6, 2, 384, seed=2, steps=400, lr=3e-3, head_dim=32),
        }
    )
    derivative: DerivativeSpec = field(default_factory=DerivativeSpec)
    source: str = "S"
    recipes: dict[str, LoraRecipe] = field(
        default_factory=lambda: {
            "facts": LoraRecipe(steps=400, lr=3e-3),
            "addition": LoraRecipe(steps=1000, lr=5e-3, dropout=0.2, weight_decay=0.1),
        }
    )
    corpus_seed: int = 0
    corpus_lines: int = 200_000
    heldout_seed: int = 1_000_000
    heldout_lines: int = 3000
    shifted_seed: int = 7
    shifted_lines: int = 60_000
    calibration_seed: int = 2_000_000
    calibration_lines: int = 512
    task_seed: int = 0
    facts_people: int = 50
    addition_max_operand: int = 24
    addition_eval: int = 200
    lora_seed: int = 0
    workers: int = 2
    threads: int = 1
    quick: bool = False

    @classmethod
    def quick_config(cls) -> ZooConfig:
        """A few-second smoke build: tiny shapes, a few steps, small tasks; numbers meaningless."""

        def tiny(arch: str, hidden: int, layers: int, seed: int, **kw: Any) -> ModelSpec:
            return ModelSpec(arch, hidden, layers, 2, 1, 2 * hidden, seed=seed, steps=4, lr=3e-3, warmup=2,
                             batch_size=4, seq_len=16, **kw)  # fmt: skip

        return cls(
            models={
                "S": tiny("llama", 32, 2, 0),
                "I": tiny("llama", 32, 2, 1),
                "X": tiny("gemma2", 48, 3, 2, head_dim=16),
            },
            derivative=DerivativeSpec(max_steps=6, warmup=1, lr=3e-3, batch_size=4, seq_len=16),
            recipes={"facts": LoraRecipe(steps=3, batch_size=8), "addition": LoraRecipe(steps=3, batch_size=8)},
            corpus_lines=1500,
            heldout_lines=100,
            shifted_lines=500,
            calibration_lines=32,
            facts_people=4,
            addition_max_operand=5,
            addition_eval=12,
            workers=1,
            quick=True,
        )

    @property
    def targets(self) -> list[str]:
        """Every model but the source: the derivatives, then the other pretrained models."""
        others = [name for name in self.models if name != self.source]
        return list(self.derivative.targets) + others

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- helpers run inside the workers -------------------------------------------------------


def _init_worker(threads: int) -> None:
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _load_tokens(out: Path, name: str) -> Any:
    import torch

    return torch.load(out / "corpus" / f"{name}.pt").long()


def _save_model(model: Any, tokenizer: Any, path: Path) -> None:
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def _model_config(spec: ModelSpec, tokenizer: Any) -> Any:
    from .tiny import tiny_config

    extra: dict[str, Any] = {
        "vocab": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "max_position_embeddings": 128,
    }
    if spec.arch == "llama":
        extra["tie_word_embeddings"] = False
    if spec.arch == "gemma2":
        extra["query_pre_attn_scalar"] = spec.head_dim or spec.hidden // spec.heads
    return tiny_config(
        spec.arch,
        hidden=spec.hidden,
        layers=spec.layers,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        intermediate=spec.intermediate,
        head_dim=spec.head_dim,
        **extra,
    )


def _job_pretrain(out_dir: str, config: ZooConfig, name: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import heldout_loss, pretrain

    out = Path(out_dir)
    spec = config.models[name]
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_model_config(spec, tokenizer))
    logged = pretrain(
        model,
        _load_tokens(out, "train"),
        steps=spec.steps,
        lr=spec.lr,
        seed=spec.seed,
        batch_size=spec.batch_size,
        seq_len=spec.seq_len,
        warmup=spec.warmup,
    )
    _save_model(model, tokenizer, out / "models" / name)
    return {
        "path": f"models/{name}",
        "arch": spec.arch,
        "shape": spec.shape(),
        "params": sum(p.numel() for p in model.parameters()),
        "seed": spec.seed,
        "parent": None,
        "corpus": "base",
        "steps": logged.steps,
        "lr": spec.lr,
        "tokens_seen": logged.steps * spec.batch_size * spec.seq_len,
        "train_loss": logged.final_loss,
        "heldout_loss": heldout_loss(model, _load_tokens(out, "heldout")),
        "heldout_loss_shifted": heldout_loss(model, _load_tokens(out, "heldout_shifted")),
        "seconds": logged.seconds,
    }


def _job_derive(out_dir: str, config: ZooConfig) -> dict[str, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import heldout_loss, pretrain, projection_weights, relative_drift

    out = Path(out_dir)
    spec = config.derivative
    parent = config.models[spec.parent]
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(out / "models" / spec.parent))
    source = {k: v.detach().clone() for k, v in projection_weights(model).items()}
    heldout, heldout_shifted = _load_tokens(out, "heldout"), _load_tokens(out, "heldout_shifted")
    pending = sorted(spec.targets.items(), key=lambda kv: kv[1])
    results: dict[str, dict[str, Any]] = {}

    def snapshot(name: str, step: int, lm: Any, drift: dict[str, float], note: str = "") -> None:
        _save_model(lm, tokenizer, out / "models" / name)
        results[name] = {
            "path": f"models/{name}",
            "arch": parent.arch,
            "shape": parent.shape(),
            "params": sum(p.numel() for p in lm.parameters()),
            "seed": spec.seed,
            "parent": spec.parent,
            "corpus": "shifted",
            "steps": step + 1,
            "lr": spec.lr,
            "target_drift": spec.targets[name],
            "drift": drift,
            "heldout_loss": heldout_loss(lm, heldout),
            "heldout_loss_shifted": heldout_loss(lm, heldout_shifted),
            "note": note,
        }
        lm.train()

    def on_step(step: int, lm: Any) -> bool:
        drift = relative_drift(lm, source)
        while pending and drift["all"] >= pending[0][1]:
            snapshot(pending.pop(0)[0], step, lm, drift)
        return not pending

    logged = pretrain(
        model,
        _load_tokens(out, "shifted"),
        steps=spec.max_steps,
        lr=spec.lr,
        seed=spec.seed,
        batch_size=spec.batch_size,
        seq_len=spec.seq_len,
        warmup=spec.warmup,
        final_lr=1.0,
        on_step=on_step,
    )
    for name, _ in pending:  # not reached within max_steps: keep the last state, say so
        snapshot(name, logged.steps - 1, model, relative_drift(model, source), "target drift not reached")
    for entry in results.values():
        entry["seconds"] = logged.seconds
    return results


def _job_lora(out_dir: str, config: ZooConfig, base: str, task: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluate import evaluate, load_arc_jsonl
    from .tasks import answer_text
    from .train import train_lora

    out = Path(out_dir)
    model_dir = out / "models" / base
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    train = load_arc_jsonl(out / "tasks" / task / "train.jsonl")
    evaluation = load_arc_jsonl(out / "tasks" / task / "eval.jsonl")
    base_result = evaluate(model, tokenizer, evaluation, batch_size=64, progress=False)
    recipe = config.recipes[task]
    peft_model, logged = train_lora(
        model, tokenizer, [(r["question"], answer_text(r)) for r in train], recipe, seed=config.lora_seed
    )
    result = evaluate(peft_model, tokenizer, evaluation, batch_size=64, progress=False)
    train_result = evaluate(peft_model, tokenizer, train[:200], batch_size=64, progress=False)
    name = f"{base}-{task}"
    peft_model.peft_config["default"].base_model_name_or_path = f"models/{base}"
    peft_model.save_pretrained(str(out / "loras" / name), save_embedding_layers=False)
    return {
        "lora": {
            "path": f"loras/{name}",
            "base": base,
            "task": task,
            "role": "source" if base == config.source else "oracle",
            "acc": result.acc,
            "acc_norm": result.acc_norm,
            "n": result.n,
            "train_acc": train_result.acc,
            "train_loss": logged.final_loss,
            "steps": logged.steps,
            "seconds": logged.seconds,
        },
        "base_accuracy": {"acc": base_result.acc, "acc_norm": base_result.acc_norm, "n": base_result.n},
    }


# -- orchestration ------------------------------------------------------------------------


@dataclass
class _Job:
    name: str
    fn: Any
    args: tuple[Any, ...]
    deps: tuple[str, ...] = ()


def _run_jobs(jobs: list[_Job], workers: int, threads: int, progress: bool) -> dict[str, Any]:
    """Run ``jobs`` (listed in priority order) with their dependencies, ``workers`` at a time."""
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def say(text: str) -> None:
        if progress:
            print(f"[zoo] {text}", flush=True)

    if workers <= 1:
        _init_worker(threads)
        for job in jobs:
            started = time.perf_counter()
            results[job.name] = job.fn(*job.args)
            seconds[job.name] = time.perf_counter() - started
            say(f"{job.name} done in {seconds[job.name]:.0f} s")
        results["_seconds"] = seconds
        return results

    import multiprocessing

    pending = list(jobs)
    running: dict[Future[Any], tuple[_Job, float]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                if all(dep in results for dep in job.deps):
                    pending.remove(job)
                    running[pool.submit(job.fn, *job.args)] = (job, time.perf_counter())
                    say(f"{job.name} started")
            if not running:
                raise RuntimeError(f"zoo jobs with unmet dependencies: {[j.name for j in pending]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job, started = running.pop(future)
                results[job.name] = future.result()  # re-raises a worker's exception
                seconds[job.name] = time.perf_counter() - started
                say(f"{job.name} done in {seconds[job.name]:.0f} s")
    results["_seconds"] = seconds
    return results


def _prepare(out: Path, config: ZooConfig) -> dict[str, Any]:
    """Tokenizer, corpora (as token tensors), tasks and calibration text; returns manifest parts."""
    import torch

    from .corpus import CorpusGenerator, build_tokenizer, write_lines
    from .tasks import addition_task, facts_task
    from .train import pack

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(out / "tokenizer"))
    corpora = {
        "train": ("base", config.corpus_seed, config.corpus_lines),
        "heldout": ("base", config.heldout_seed, config.heldout_lines),
        "shifted": ("shifted", config.shifted_seed, config.shifted_lines),
        "heldout_shifted": ("shifted", config.heldout_seed + 1, config.heldout_lines),
    }
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    corpus_info: dict[str, Any] = {}
    for name, (style, seed, lines) in corpora.items():
        tokens = pack(tokenizer, CorpusGenerator(seed, style).sentences(lines))
        torch.save(tokens.to(torch.int32), out / "corpus" / f"{name}.pt")
        corpus_info[name] = {"style": style, "seed": seed, "lines": lines, "tokens": len(tokens)}
    write_lines(out / "calibration.txt", CorpusGenerator(config.calibration_seed).sentences(config.calibration_lines))
    tasks = {
        "facts": facts_task(config.task_seed, people=config.facts_people),
        "addition": addition_task(
            config.task_seed, max_operand=config.addition_max_operand, n_eval=config.addition_eval
        ),
    }
    task_info = {}
    for name, task in tasks.items():
        entry = task.write(out / "tasks" / name)
        entry["train"] = f"tasks/{name}/train.jsonl"
        entry["eval"] = f"tasks/{name}/eval.jsonl"
        task_info[name] = entry
    return {
        "tokenizer": {"path": "tokenizer", "vocab_size": len(tokenizer), "kind": "word-level"},
        "corpus": corpus_info,
        "calibration": {"path": "calibration.txt", "lines": config.calibration_lines, "seed": config.calibration_seed},
        "tasks": task_info,
    }


def build_zoo(
    out_dir: str | os.PathLike[str],
    quick: bool = False,
    *,
    config: ZooConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Build the zoo under ``out_dir`` and write its ``manifest.json``; return the manifest path.

    Args:
        quick: a few-second smoke build (:meth:`ZooConfig.quick_config`); numbers meaningless.
        config: the full description (default :class:`ZooConfig`, or the quick one).
        workers: processes (default: the config's; the quick config runs in-process).
        command: the command line that asked for the build (recorded in the manifest).
    """
    from .train import relative_drift

    started = time.perf_counter()
    config = config or (ZooConfig.quick_config() if quick else ZooConfig())
    if workers is not None:
        config = replace(config, workers=workers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": FORMAT_VERSION, "quick": config.quick, "source": config.source}
    manifest.update(_prepare(out, config))
    prepared = time.perf_counter() - started

    derivatives = tuple(config.derivative.targets)
    # priority order: the source, then the longest jobs (the larger model) and the source's chain
    pretrain_order = sorted(config.models, key=lambda n: (n != config.source, -_cost(config.models[n])))
    jobs = [_Job(name, _job_pretrain, (str(out), config, name)) for name in pretrain_order]
    jobs.insert(2, _Job("derive", _job_derive, (str(out), config), (config.derivative.parent,)))
    # longest chain first: source, its derivatives and their LoRAs; the other models beside
    bases = [config.source, *config.targets]
    for base in sorted(bases, key=lambda b: (b not in derivatives, b != config.source)):
        dep = "derive" if base in derivatives else base
        jobs.extend(
            _Job(f"{base}-{task}", _job_lora, (str(out), config, base, task), (dep,)) for task in config.recipes
        )
    results = _run_jobs(jobs, config.workers, config.threads, progress)

    models: dict[str, Any] = {name: results[name] for name in config.models}
    models.update(results["derive"])
    # drift of every same-shape model vs the source (the independent model's is large)
    from transformers import AutoModelForCausalLM

    def projections(name: str) -> dict[str, Any]:
        from .train import projection_weights

        lm = AutoModelForCausalLM.from_pretrained(str(out / models[name]["path"]))
        return {k: v.detach() for k, v in projection_weights(lm).items()}

    source_weights = projections(config.source)
    for name, entry in models.items():
        if "drift" in entry:
            continue
        same = entry["shape"] == models[config.source]["shape"] and entry["arch"] == models[config.source]["arch"]
        entry["drift"] = relative_drift(projections(name), source_weights) if same else None
    loras: dict[str, Any] = {}
    base_accuracy: dict[str, dict[str, Any]] = {}
    for job_name, result in results.items():
        if isinstance(result, dict) and "lora" in result:
            lora = result["lora"]
            loras[job_name] = lora
            base_accuracy.setdefault(lora["base"], {})[lora["task"]] = result["base_accuracy"]
    order = [config.source, *config.targets]
    manifest["models"] = {name: models[name] for name in order}
    manifest["loras"] = {k: loras[k] for k in sorted(loras, key=lambda k: (order.index(loras[k]["base"]), k))}
    manifest["base_accuracy"] = {name: base_accuracy.get(name, {}) for name in order}
    manifest["config"] = config.to_dict()
    manifest["build"] = {
        "seconds": time.perf_counter() - started,
        "prepare_seconds": prepared,
        "job_seconds": results["_seconds"],
        "workers": config.workers,
        "threads_per_worker": config.threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": _versions(),
        "command": command,
    }
    path = out / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _cost(spec: ModelSpec) -> float:
    """Rough pretraining cost: steps x parameters of the decoder."""
    return spec.steps * spec.layers * spec.hidden * (spec.hidden + spec.intermediate)


def _versions() -> dict[str, str]:
    import peft
    import tokenizers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
    }
