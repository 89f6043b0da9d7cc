"""Build the real-model benchmark's inputs stage by stage, cached: models, text, derivatives, LoRAs, scores.

Under ``work``::

    assets.json                   everything below with recipes, seeds, wall times, peak RSS, scores
    stages/<stage>.json           one record per finished stage (a stage with a record is not rerun)
    models/smollm2, gemma3        the GGUF models dequantized to float32 safetensors directories
    models/Dsmall, Dlarge         SmolLM2 continued (full fine-tuning) on Python standard-library
                                  sources, saved when the projection drift reaches 3 % / 10 % or at the step limit
    tasks/<task>/                 train.jsonl, eval.jsonl (ARC format): ``facts``, ``bins``
    calibration/generic.txt       512 prose paragraphs of /usr/share/doc, one a line
    calibration/<task>.txt        the task's training questions without answers, one a line
    loras/<base>-<task>/          PEFT LoRA (r=16, alpha=32, seven projections) on SmolLM2 (the
                                  source) and, with the same recipe, on each target (the oracles)

Every stage runs in a fresh spawned process (its peak RSS is its own) with ``threads``
torch threads, in dependency order; everything is seeded.

Example::

    >>> from loraport.pretrained.build import build_assets
    >>> build_assets("benchmarks/work/real", gguf_dir="/work/models")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..errors import LoraportError
from ..io import atomic_write_text
from ..report import finite_json
from ..zoo.build import _init_worker  # one worker set-up (threads, quiet transformers) for both builders
from ..zoo.train import LoraRecipe

log = logging.getLogger(__name__)

ASSETS = "assets.json"
SOURCE = "smollm2"
TASKS = ("facts", "bins")


@dataclass
class DeriveSpec:
    """Continued full fine-tuning of SmolLM2 on Python sources, one phase per drift target.

    Phase ``i`` trains with ``lrs[target_i]`` (a fresh AdamW, ``warmup`` steps, then constant)
    until the projection drift reaches ``target_i``, at most ``max_steps`` steps, and saves a
    snapshot (noted when the target was not reached). Measured: drift grows about as
    ``lr * sqrt(steps)``; reaching 3 % / 10 % in 16 / 54 steps took lr 1.5e-3 / 3e-3, which
    wrecked the model (held-out loss +1.3 / +3.2 nats on generic text, +1.7 / +3.1 on the
    Python text trained on); 20 / 40 steps at 3e-4 / 6e-4 gave 0.57 % / 1.23 %, and 190 steps
    at 3e-4 gave 1.93 % (35 minutes on two shared cores). The defaults are the compromise
    these machines afford: 1 % at 6e-4, then 3 % at 1e-3 (short of the lr that wrecked it),
    each phase at most ``max_steps``; the drift and held-out losses reached are recorded.
    """

    targets: dict[str, float] = field(default_factory=lambda: {"Dsmall": 0.01, "Dlarge": 0.03})
    lrs: dict[str, float] = field(default_factory=lambda: {"Dsmall": 6e-4, "Dlarge": 1e-3})
    warmup: int = 10
    max_steps: int = 150
    batch_size: int = 4
    seq_len: int = 128
    weight_decay: float = 0.0
    seed: int = 0
    check_every: int = 5
    train_chars: int = 3_000_000
    heldout_chars: int = 15_000


@dataclass
class RealConfig:
    """Everything that decides the assets (recorded in ``assets.json``)."""

    recipes: dict[str, LoraRecipe] = field(
        default_factory=lambda: {
            "facts": LoraRecipe(steps=120, lr=3e-3, batch_size=16, warmup=10),
            "bins": LoraRecipe(steps=150, lr=2e-3, batch_size=16, warmup=10, dropout=0.1),
        }
    )
    derive: DeriveSpec = field(default_factory=DeriveSpec)
    task_seed: int = 0
    lora_seed: int = 0
    text_seed: int = 0
    calibration_lines: int = 512
    heldout_lines: int = 50
    eval_batch: dict[str, int] = field(default_factory=lambda: {"smollm2": 32, "gemma3": 16})
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- stages (each runs in its own process) ------------------------------------------------


def _family(base: str) -> str:
    return "gemma3" if base == "gemma3" else "smollm2"


def _load(work: Path, base: str, adapter: Path | None = None) -> tuple[Any, Any]:
    from ..evaluate import load_model, load_tokenizer

    model_path = work / "models" / base
    return load_model(model_path, adapter), load_tokenizer(model_path)


def _score(model: Any, tokenizer: Any, records: list[dict], batch_size: int) -> dict[str, Any]:
    from ..evaluate import evaluate

    result = evaluate(model, tokenizer, records, batch_size=batch_size, progress=False)
    return {"acc": result.acc, "acc_norm": result.acc_norm, "n": result.n, "seconds": round(result.seconds, 1)}


def _records(work: Path, task: str, split: str) -> list[dict]:
    from ..evaluate import load_arc_jsonl

    return load_arc_jsonl(work / "tasks" / task / f"{split}.jsonl")


def stage_models(work: Path, config: RealConfig, gguf_dir: str | None) -> dict[str, Any]:
    """Convert both GGUF models to float32 safetensors directories."""
    from .packages import MODELS, convert_gguf, gguf_path

    out: dict[str, Any] = {}
    for name in MODELS:
        started = time.perf_counter()
        gguf = gguf_path(name, gguf_dir)
        path = convert_gguf(gguf, work / "models" / name)
        config_json = json.loads((path / "config.json").read_text(encoding="utf-8"))
        out[name] = {
            "path": f"models/{name}",
            "gguf": str(gguf),
            "model_type": config_json["model_type"],
            "dtype": "float32",
            "seconds": round(time.perf_counter() - started, 1),
        }
    return out


def stage_data(work: Path, config: RealConfig, gguf_dir: str | None) -> dict[str, Any]:
    """Tasks (ARC JSONL) and calibration text."""
    from ..zoo.corpus import write_lines
    from .tasks import real_tasks
    from .text import generic_lines, task_domain_lines

    out: dict[str, Any] = {"tasks": {}, "calibration": {}}
    for task in real_tasks(config.task_seed):
        out["tasks"][task.name] = {
            k: (os.path.relpath(v, work) if k in ("train", "eval") else v)
            for k, v in task.write(work / "tasks" / task.name).items()
        }
        write_lines(work / "calibration" / f"{task.name}.txt", task_domain_lines(task))
        out["calibration"][task.name] = {
            "path": f"calibration/{task.name}.txt",
            "lines": len(task.train),
            "what": "the task's training questions without answers, as 'Question: q Answer:'",
        }
    write_lines(work / "calibration" / "generic.txt", generic_lines(config.calibration_lines, config.text_seed))
    out["calibration"]["generic"] = {
        "path": "calibration/generic.txt",
        "lines": config.calibration_lines,
        "what": f"prose paragraphs of /usr/share/doc (READMEs, NEWS, .txt, .md), seed {config.text_seed}",
    }
    return out


def stage_derive(work: Path, config: RealConfig, gguf_dir: str | None) -> dict[str, Any]:
    """SmolLM2 continued on Python sources; snapshots when the projection drift reaches each target."""
    from ..zoo.train import heldout_loss, pack, pretrain, projection_weights, relative_drift
    from .text import generic_lines, python_source

    spec = config.derive
    model, tokenizer = _load(work, SOURCE)
    train_text = python_source(spec.train_chars, spec.seed)
    heldout_text = python_source(spec.heldout_chars, spec.seed, skip_files=len(train_text))  # files not trained on
    tokens = pack(tokenizer, train_text)
    heldout = {
        "generic": pack(
            tokenizer, generic_lines(config.heldout_lines, config.text_seed, skip=config.calibration_lines)
        ),
        "python": pack(tokenizer, heldout_text),
    }

    def losses(lm: Any) -> dict[str, float]:
        return {name: round(heldout_loss(lm, ids, seq_len=128, batch_size=16), 4) for name, ids in heldout.items()}

    base_losses = losses(model)
    source = {k: v.detach().clone() for k, v in projection_weights(model).items()}
    started = time.perf_counter()
    results: dict[str, Any] = {"source_heldout_loss": base_losses, "train_tokens_available": len(tokens)}
    total_steps = 0
    for phase, (name, target) in enumerate(sorted(spec.targets.items(), key=lambda kv: kv[1])):
        reached: dict[str, float] = {}

        def on_step(
            step: int, lm: Any, target: float = target, reached: dict[str, float] = reached, before: int = total_steps
        ) -> bool:
            if (step + 1) % spec.check_every:
                return False
            drift = relative_drift(lm, source)
            log.info("derive step %d drift %.4f", before + step + 1, drift["all"])
            if drift["all"] >= target:
                reached.update(drift)
            return bool(reached)

        logged = pretrain(
            model,
            tokens,
            steps=spec.max_steps,
            lr=spec.lrs[name],
            seed=spec.seed + phase,
            batch_size=spec.batch_size,
            seq_len=spec.seq_len,
            warmup=spec.warmup,
            final_lr=1.0,
            weight_decay=spec.weight_decay,
            on_step=on_step,
        )
        total_steps += logged.steps
        drift = reached or relative_drift(model, source)
        model.save_pretrained(str(work / "models" / name))
        tokenizer.save_pretrained(str(work / "models" / name))
        results[name] = {
            "path": f"models/{name}",
            "parent": SOURCE if phase == 0 else f"{SOURCE} via the previous snapshot",
            "corpus": "Python standard-library sources",
            "lr": spec.lrs[name],
            "phase_steps": logged.steps,
            "steps": total_steps,
            "tokens_seen": total_steps * spec.batch_size * spec.seq_len,
            "target_drift": target,
            "drift": {k: round(v, 5) for k, v in drift.items()},
            "heldout_loss": losses(model),
            "train_seconds": round(time.perf_counter() - started, 1),
            "train_loss_first_last": [logged.losses[0] if logged.losses else None, logged.final_loss],
            "note": "" if reached else f"target drift not reached in {spec.max_steps} steps",
        }
        model.train()
    return results


def stage_lora(work: Path, config: RealConfig, base: str, task: str) -> dict[str, Any]:
    """Score the base, train the task's LoRA on it (the source's or an oracle), score it, save it."""
    from ..zoo.tasks import answer_text
    from ..zoo.train import train_lora

    model, tokenizer = _load(work, base)
    train, evaluation = _records(work, task, "train"), _records(work, task, "eval")
    batch = config.eval_batch[_family(base)]
    base_stage, identity = (work / "stages" / f"{kind}-{base}-{task}.json" for kind in ("base", "identity"))
    if base_stage.is_file():  # scored the same base already
        base_score = json.loads(base_stage.read_text(encoding="utf-8"))["score"]
    elif identity.is_file():
        base_score = json.loads(identity.read_text(encoding="utf-8"))["base_score"]
    else:
        base_score = _score(model, tokenizer, evaluation, batch)
    recipe = config.recipes[task]
    items = [(r["question"], answer_text(r)) for r in train]
    started = time.perf_counter()

    def on_step(step: int, _: Any) -> bool:
        if (step + 1) % 25 == 0:
            log.info("lora %s-%s step %d/%d, %.1f s/step", base, task, step + 1, recipe.steps,
                     (time.perf_counter() - started) / (step + 1))  # fmt: skip
        return False

    peft_model, logged = train_lora(model, tokenizer, items, recipe, config.lora_seed, on_step, answer_logits_only=True)
    name = f"{base}-{task}"
    peft_model.peft_config["default"].base_model_name_or_path = f"models/{base}"
    peft_model.save_pretrained(str(work / "loras" / name), save_embedding_layers=False)
    out = {
        "path": f"loras/{name}",
        "base": base,
        "task": task,
        "role": "source" if base == SOURCE else "oracle",
        "base_score": base_score,
        "score": _score(peft_model, tokenizer, evaluation, batch),
        "train_steps": logged.steps,
        "train_seconds": round(logged.seconds, 1),
        "train_loss_first_last": [logged.losses[0] if logged.losses else None, logged.final_loss],
        "seed": config.lora_seed,
    }
    if train != evaluation and base == SOURCE:  # the generalisation gap, on the source only (time)
        out["train_score"] = _score(peft_model, tokenizer, train, batch)
    return out


def stage_base(work: Path, config: RealConfig, base: str, task: str) -> dict[str, Any]:
    """A model's score on a task without any adapter."""
    model, tokenizer = _load(work, base)
    score = _score(model, tokenizer, _records(work, task, "eval"), config.eval_batch[_family(base)])
    return {"model": base, "task": task, "score": score}


def stage_identity(work: Path, config: RealConfig, target: str, task: str) -> dict[str, Any]:
    """The target's base score, and the source's LoRA copied unchanged onto it (the simplest port), scored."""
    from peft import PeftModel

    model, tokenizer = _load(work, target)
    records, batch = _records(work, task, "eval"), config.eval_batch[_family(target)]
    base_score = _score(model, tokenizer, records, batch)
    ported = PeftModel.from_pretrained(model, str(work / "loras" / f"{SOURCE}-{task}"))
    return {
        "target": target,
        "task": task,
        "adapter": f"loras/{SOURCE}-{task}",
        "base_score": base_score,
        "score": _score(ported, tokenizer, records, batch),
    }


# -- orchestration ------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    fn: Callable[..., dict[str, Any]]
    args: tuple[Any, ...]
    deps: tuple[str, ...] = ()


def stages(config: RealConfig, gguf_dir: str | None) -> list[Stage]:
    """The stages in priority order (cheap, informative ones first), each with the stages it needs."""
    derivatives = list(config.derive.targets)
    out = [Stage("models", stage_models, (gguf_dir,)), Stage("data", stage_data, (gguf_dir,))]
    out.append(Stage("derive", stage_derive, (gguf_dir,), ("models", "data")))
    out += [Stage(f"lora-{SOURCE}-{task}", stage_lora, (SOURCE, task), ("models", "data")) for task in TASKS]
    for task in TASKS:
        for target in derivatives:
            needs = ("derive", f"lora-{SOURCE}-{task}")
            out.append(Stage(f"identity-{target}-{task}", stage_identity, (target, task), needs))
    out += [Stage(f"base-gemma3-{task}", stage_base, ("gemma3", task), ("models", "data")) for task in TASKS]
    for task in TASKS:
        out += [Stage(f"lora-{target}-{task}", stage_lora, (target, task), ("derive",)) for target in derivatives]
        out.append(Stage(f"lora-gemma3-{task}", stage_lora, ("gemma3", task), ("models", "data")))
    return out


def _run_stage(work: str, config: RealConfig, stage: Stage) -> dict[str, Any]:
    from ..report import peak_rss_mb

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    result = stage.fn(Path(work), config, *stage.args)
    return {**result, "wall_seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_rss_mb())}


def build_assets(
    work: str | os.PathLike[str],
    config: RealConfig | None = None,
    gguf_dir: str | None = None,
    only: list[str] | None = None,
    redo: list[str] | None = None,
    workers: int = 2,
    say: Callable[[str], None] = print,
) -> Path:
    """Run every stage without a record under ``work/stages`` (``only``: just those; ``redo``: rerun those),
    ``workers`` at a time, each in a fresh process; write ``work/assets.json`` and return its path."""
    config = config or RealConfig()
    root = Path(work)
    records, failed = run_stages(root, config, stages(config, gguf_dir), only, redo, workers, config.threads, say)
    assets = {"config": config.to_dict(), "gguf_dir": gguf_dir, "stages": records}
    written = atomic_write_text(root / ASSETS, json.dumps(finite_json(assets), indent=1) + "\n")
    if failed:
        raise LoraportError(f"{len(failed)} stage(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return written


def run_stages(
    root: Path,
    config: Any,
    planned: list[Stage],
    only: list[str] | None = None,
    redo: list[str] | None = None,
    workers: int = 2,
    threads: int = 1,
    say: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the ``planned`` stages that have no record under ``root/stages`` (see :func:`build_assets`).

    Each stage runs ``stage.fn(root, config, *stage.args)`` in a fresh spawned process with
    ``threads`` torch threads, once every stage it needs has a record (written by this run or
    by another runner on the same directory); its record is written atomically. Returns the
    records of every planned stage that has one and ``{stage: why}`` of the failed ones.
    """
    (root / "stages").mkdir(parents=True, exist_ok=True)
    records: dict[str, Any] = {}
    pending: list[Stage] = []
    for stage in planned:
        record = _read_stage(root, stage.name)
        if record is not None and stage.name not in (redo or []):
            records[stage.name] = record
        elif only is None or stage.name in only:
            pending.append(stage)
    running: dict[Future[Any], tuple[Stage, ProcessPoolExecutor]] = {}
    failed: dict[str, str] = {}
    context = get_context("spawn")
    try:
        while pending or running:
            for stage in list(pending):
                if len(running) >= workers:
                    break
                for dep in stage.deps:  # finished by another runner on the same work directory?
                    if dep not in records and (record := _read_stage(root, dep)) is not None:
                        records[dep] = record
                if all(dep in records for dep in stage.deps):
                    pending.remove(stage)
                    # one pool per stage: a fresh process, so its peak RSS is its own
                    pool = ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker, initargs=(threads,))
                    running[pool.submit(_run_stage, str(root), config, stage)] = (stage, pool)
                    say(f"[{time.strftime('%H:%M:%S')}] stage {stage.name} ...")
            if not running:
                raise LoraportError(f"stages whose inputs are missing: {[s.name for s in pending]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage, pool = running.pop(future)
                pool.shutdown()
                try:
                    record = future.result()
                except Exception as exc:  # the other stages go on; what needs this one is dropped
                    failed[stage.name] = f"{type(exc).__name__}: {exc}"
                    say(f"[{time.strftime('%H:%M:%S')}] stage {stage.name} FAILED: {failed[stage.name]}")
                    pending = _drop_dependents(pending, stage.name, failed)
                    continue
                atomic_write_text(
                    root / "stages" / f"{stage.name}.json", json.dumps(finite_json(record), indent=1) + "\n"
                )
                records[stage.name] = record
                say(f"[{time.strftime('%H:%M:%S')}] stage {stage.name}: {record['wall_seconds']:.0f} s, "
                    f"peak RSS {record['peak_rss_mb']} MB")  # fmt: skip
    finally:
        for _, pool in running.values():
            pool.shutdown(cancel_futures=True)
    for stage in planned:  # stages another runner on this work directory finished meanwhile
        if stage.name in records or stage.name in failed:
            continue
        if (record := _read_stage(root, stage.name)) is not None:
            records[stage.name] = record
    return records, failed


def _read_stage(root: Path, name: str) -> dict[str, Any] | None:
    """The record of stage ``name`` under ``root/stages``, or None when it has not finished."""
    path = root / "stages" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _drop_dependents(pending: list[Stage], name: str, failed: dict[str, str]) -> list[Stage]:
    """``pending`` without the stages that need ``name`` (directly or not); those are recorded in ``failed``."""
    lost = {name}
    kept: list[Stage] = []
    for stage in pending:  # priority order lists a stage after what it needs
        if lost & set(stage.deps):
            lost.add(stage.name)
            failed[stage.name] = f"needs {name}, which failed"
        else:
            kept.append(stage)
    return kept
