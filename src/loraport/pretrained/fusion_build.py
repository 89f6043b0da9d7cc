"""Build the real fusion benchmark's inputs stage by stage, cached (as :mod:`loraport.pretrained.build`).

Under ``work``::

    stages/<stage>.json       one record per finished stage (a stage with a record is not rerun)
    tasks/<task>/             train.jsonl, dev.jsonl, eval.jsonl (ARC format) of the four tasks:
                              ``facts`` and ``bins`` as the real benchmark wrote them (their
                              first evaluation records set aside as dev), ``smallest`` and
                              ``json`` (:mod:`loraport.pretrained.fusion_tasks`)
    calibration/<task>.txt    the task's training questions without answers (RegMean's inputs)
    text/<domain>-<split>.json  ``python`` (standard-library sources) and ``docs`` (prose of
                              /usr/share/doc): train, dev and eval text, disjoint
    loras/smollm2-<task>/     the two new LoRAs (r=16, alpha=32, seven projections) on SmolLM2
    models/<domain>/          SmolLM2 continued (full fine-tuning, every weight) on one domain

The real benchmark's work directory (``real``, read only) provides SmolLM2 as a float32
directory, the ``facts`` and ``bins`` tasks and their LoRAs. Every stage runs in its own
spawned process (:func:`loraport.pretrained.build.run_stages`); everything is seeded.

Example::

    >>> build_fusion_assets("benchmarks/work/fusion_real", "benchmarks/work/real")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LoraportError
from ..io import atomic_directory, atomic_write_text
from ..zoo.train import LoraRecipe
from .build import Stage, run_stages

log = logging.getLogger(__name__)

SOURCE = "smollm2"
REAL_TASKS = ("facts", "bins")
NEW_TASKS = ("smallest", "json")
TASKS = REAL_TASKS + NEW_TASKS
DOMAINS = ("python", "docs")


@dataclass
class DomainSpec:
    """Continued full fine-tuning of SmolLM2 on one text domain (AdamW, warm-up, then constant ``lr``).

    ``lr`` is kept well below the real benchmark's 6e-4, which raised SmolLM2's held-out loss
    on the very Python text it trained on (``benchmarks/results/real_assets.md``).
    """

    lr: float = 1e-4
    steps: int = 30
    warmup: int = 5
    batch_size: int = 8
    seq_len: int = 128
    check_every: int = 10
    train_chars: int = 1_500_000
    dev_chars: int = 12_000
    eval_chars: int = 24_000
    seed: int = 0


@dataclass
class FusionRealConfig:
    """Everything that decides the inputs (recorded in each stage's record)."""

    real: str = "benchmarks/work/real"
    recipes: dict[str, LoraRecipe] = field(
        default_factory=lambda: {
            "smallest": LoraRecipe(steps=150, lr=2e-3, batch_size=16, warmup=10, dropout=0.1),
            "json": LoraRecipe(steps=80, lr=2e-3, batch_size=16, warmup=10),
        }
    )
    derive: DomainSpec = field(default_factory=DomainSpec)
    dev_records: dict[str, int] = field(default_factory=lambda: {"facts": 48, "bins": 40})
    task_seed: int = 0
    lora_seed: int = 0
    text_seed: int = 0
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def source_model(self) -> Path:
        return Path(self.real) / "models" / SOURCE


# -- stages (each runs in its own process) ------------------------------------------------


def _text(work: Path, domain: str, split: str) -> list[str]:
    return json.loads((work / "text" / f"{domain}-{split}.json").read_text(encoding="utf-8"))


def domain_text(domain: str, split: str, spec: DomainSpec, seed: int) -> list[str]:
    """``python`` or ``docs`` text of one split; the splits are disjoint (files or paragraphs)."""
    from .text import doc_paragraphs, python_source

    if domain == "python":
        train = python_source(spec.train_chars, seed)
        if split == "train":
            return train
        dev = python_source(spec.dev_chars, seed, skip_files=len(train))
        return dev if split == "dev" else python_source(spec.eval_chars, seed, skip_files=len(train) + len(dev))
    import random

    paragraphs = doc_paragraphs()
    random.Random(seed + 1).shuffle(paragraphs)  # another order than the real benchmark's calibration text
    out: list[str] = []
    budget = {"train": spec.train_chars, "dev": spec.dev_chars, "eval": spec.eval_chars}
    start = 0
    for name in ("train", "dev", "eval"):
        chosen, total = [], 0
        while total < budget[name]:
            if start >= len(paragraphs):
                raise LoraportError(f"not enough documentation prose for the {name} split of docs")
            chosen.append(paragraphs[start])
            total += len(paragraphs[start])
            start += 1
        if name == split:
            out = chosen
    return out


def stage_data(work: Path, config: FusionRealConfig) -> dict[str, Any]:
    """The four tasks with dev splits, their calibration lines, the two domains' text."""
    from ..zoo.corpus import write_lines
    from ..zoo.tasks import Task, write_jsonl
    from .fusion_tasks import json_task, smallest_task, with_dev
    from .text import task_domain_lines

    real = Path(config.real)
    out: dict[str, Any] = {"tasks": {}, "text": {}}
    tasks: list[Task] = []
    for name in REAL_TASKS:
        records = [json.loads(line) for line in (real / "tasks" / name / "train.jsonl").read_text().splitlines()]
        held = [json.loads(line) for line in (real / "tasks" / name / "eval.jsonl").read_text().splitlines()]
        kind = "memorisation" if name == "facts" else "held-out skill"
        task = Task(name, kind, records, held, f"the real benchmark's {name}")
        tasks.append(with_dev(task, config.dev_records[name]))
    tasks += [smallest_task(config.task_seed), json_task(config.task_seed)]
    for task in tasks:
        directory = work / "tasks" / task.name
        directory.mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev", "eval"):
            write_jsonl(directory / f"{split}.jsonl", getattr(task, split))
        write_lines(work / "calibration" / f"{task.name}.txt", task_domain_lines(task))
        out["tasks"][task.name] = {
            "kind": task.kind,
            "description": task.description,
            **{f"n_{split}": len(getattr(task, split)) for split in ("train", "dev", "eval")},
        }
    (work / "text").mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        for split in ("train", "dev", "eval"):
            lines = domain_text(domain, split, config.derive, config.text_seed)
            atomic_write_text(work / "text" / f"{domain}-{split}.json", json.dumps(lines))
            out["text"][f"{domain}-{split}"] = {"pieces": len(lines), "chars": sum(map(len, lines))}
    return out


def stage_lora(work: Path, config: FusionRealConfig, task: str) -> dict[str, Any]:
    """Train the task's LoRA on SmolLM2 (the real benchmark's recipe machinery), score it on dev and eval."""
    from ..evaluate import load_arc_jsonl, load_model, load_tokenizer
    from ..zoo.tasks import answer_text
    from ..zoo.train import train_lora
    from .scoring import correct, shared_context_scores

    model, tokenizer = load_model(config.source_model), load_tokenizer(config.source_model)
    records = {s: load_arc_jsonl(work / "tasks" / task / f"{s}.jsonl") for s in ("train", "dev", "eval")}

    def score(lm: Any, split: str) -> float:
        rows = correct(records[split], shared_context_scores(lm, tokenizer, records[split]))
        return round(sum(rows) / len(rows), 4)

    base = {split: score(model, split) for split in ("dev", "eval")}
    recipe = config.recipes[task]
    items = [(r["question"], answer_text(r)) for r in records["train"]]
    started = time.perf_counter()

    def on_step(step: int, _: Any) -> bool:
        if (step + 1) % 25 == 0:
            log.info("lora %s step %d/%d, %.1f s/step", task, step + 1, recipe.steps,
                     (time.perf_counter() - started) / (step + 1))  # fmt: skip
        return False

    peft_model, logged = train_lora(model, tokenizer, items, recipe, config.lora_seed, on_step, answer_logits_only=True)
    peft_model.peft_config["default"].base_model_name_or_path = str(config.source_model)
    with atomic_directory(work / "loras" / f"{SOURCE}-{task}", overwrite=True) as tmp:
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
    return {
        "path": f"loras/{SOURCE}-{task}",
        "task": task,
        "recipe": asdict(recipe),
        "base_acc": base,
        "acc": {split: score(peft_model, split) for split in ("dev", "eval")},
        "train_steps": logged.steps,
        "train_seconds": round(logged.seconds, 1),
        "train_loss_first_last": [logged.losses[0] if logged.losses else None, logged.final_loss],
        "seed": config.lora_seed,
    }


def stage_derive(work: Path, config: FusionRealConfig, domain: str) -> dict[str, Any]:
    """SmolLM2 continued on one domain (every weight); held-out losses on both domains, drift."""
    from ..evaluate import load_model, load_tokenizer
    from ..zoo.train import heldout_loss, pack, pretrain, projection_weights, relative_drift

    spec = config.derive
    model, tokenizer = load_model(config.source_model), load_tokenizer(config.source_model)
    tokens = pack(tokenizer, _text(work, domain, "train"))
    heldout = {d: pack(tokenizer, _text(work, d, "dev")) for d in DOMAINS}

    def losses(lm: Any) -> dict[str, float]:
        return {d: round(heldout_loss(lm, ids, seq_len=spec.seq_len, batch_size=16), 4) for d, ids in heldout.items()}

    source = {k: v.detach().clone() for k, v in projection_weights(model).items()}
    curve = [{"step": 0, "dev_loss": losses(model)}]

    def on_step(step: int, lm: Any) -> bool:
        if (step + 1) % spec.check_every == 0:
            curve.append({"step": step + 1, "dev_loss": losses(lm)})
            log.info("derive %s step %d: %s", domain, step + 1, curve[-1]["dev_loss"])
            lm.train()
        return False

    logged = pretrain(
        model,
        tokens,
        steps=spec.steps,
        lr=spec.lr,
        seed=spec.seed,
        batch_size=spec.batch_size,
        seq_len=spec.seq_len,
        warmup=spec.warmup,
        final_lr=1.0,
        weight_decay=0.0,
        on_step=on_step,
    )
    with atomic_directory(work / "models" / domain, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return {
        "path": f"models/{domain}",
        "domain": domain,
        "spec": asdict(spec),
        "drift": {k: round(v, 5) for k, v in relative_drift(model, source).items()},
        "dev_loss_curve": curve,
        "train_tokens_available": len(tokens),
        "train_seconds": round(logged.seconds, 1),
        "train_loss_first_last": [logged.losses[0] if logged.losses else None, logged.final_loss],
    }


def fusion_stages(config: FusionRealConfig) -> list[Stage]:
    """The stages in priority order, each with the stages it needs."""
    out = [Stage("data", stage_data, ())]
    out += [Stage(f"lora-{task}", stage_lora, (task,), ("data",)) for task in NEW_TASKS]
    out += [Stage(f"derive-{domain}", stage_derive, (domain,), ("data",)) for domain in DOMAINS]
    return out


def build_fusion_assets(
    work: str | os.PathLike[str],
    config: FusionRealConfig | None = None,
    only: list[str] | None = None,
    workers: int = 2,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every stage without a record under ``work/stages``; return ``{stage: record}``."""
    config = config or FusionRealConfig()
    if not (config.source_model / "config.json").is_file():
        raise LoraportError(f"{config.source_model}: no SmolLM2 model (build the real benchmark's assets first)")
    records, failed = run_stages(Path(work), config, fusion_stages(config), only, None, workers, config.threads, say)
    if failed:
        raise LoraportError(f"{len(failed)} stage(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return records


__all__ = ["DOMAINS", "TASKS", "DomainSpec", "FusionRealConfig", "build_fusion_assets", "domain_text", "fusion_stages"]
