"""Build the generation benchmark's inputs stage by stage, cached (as :mod:`loraport.pretrained.build`).

Under ``work``::

    stages/<stage>.json        one record per finished stage (a stage with a record is not rerun)
    tasks/<task>/              train.jsonl, prompts.jsonl, eval.jsonl (:mod:`.generation_tasks`)
    loras/<base>-<task>/       a PEFT LoRA (r=16, alpha=32, seven projections) per base and task;
                               each is the source of one direction and the oracle of the other

The models are the real benchmark's float32 directories (``real/models/smollm2`` and
``real/models/gemma3``; ``benchmarks/real_assets.py --only models``). Chat adapters train
through each base's chat template: SmolLM2-Instruct's own, Gemma-3's from the built-in
``gemma`` template (the pretrained GGUF base carries none). A LoRA learns its target and the
end of the turn (the template's end-of-turn token, or EOS for plain prompts); it is scored by
the share of held-out prompts whose greedy answer passes the task's check, on its base with
and without it, and by its own side effect: its base's perplexity change on generic text
(standard-library docstrings, as ``--method distill`` measures it).
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
from ..io import atomic_write_text
from ..zoo.train import LoraRecipe
from .build import Stage, run_stages

log = logging.getLogger(__name__)

BASES = ("smollm2", "gemma3")
TASKS = ("json", "caps", "bullets")
TEMPLATES: dict[str, str | None] = {"smollm2": None, "gemma3": "gemma"}  # None: the tokenizer's own


@dataclass
class GenerationConfig:
    """Everything that decides the inputs (recorded in ``assets.json``)."""

    real: str = "benchmarks/work/real"
    recipes: dict[str, LoraRecipe] = field(
        default_factory=lambda: {task: LoraRecipe(steps=60, lr=1e-3, batch_size=16, warmup=6) for task in TASKS}
    )
    task_seed: int = 0
    lora_seed: int = 0
    content_tokens: int = 48
    eval_tokens: int = 96
    generic_lines: int = 32
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_path(config: GenerationConfig, base: str) -> Path:
    return Path(config.real) / "models" / base


def _chat(tokenizer: Any, base: str) -> Any:
    from ..chat import ChatFormat

    return ChatFormat.for_tokenizer(tokenizer, TEMPLATES[base], base)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- stages ------------------------------------------------------------------------------------


def stage_data(work: Path, config: GenerationConfig) -> dict[str, Any]:
    """The json and bullets tasks; the caps task's questions (its answers come from SmolLM2)."""
    from .generation_tasks import bullets_task, caps_prompts, json_task

    out = {task.name: task.write(work / "tasks" / task.name) for task in (json_task(config.task_seed),
                                                                          bullets_task(config.task_seed))}  # fmt: skip
    questions, held = caps_prompts(config.task_seed)
    atomic_write_text(work / "tasks" / "caps" / "questions.json", json.dumps({"train": questions, "eval": held}))
    out["caps_questions"] = {"train": len(questions), "eval": len(held)}
    return out


def stage_content(work: Path, config: GenerationConfig) -> dict[str, Any]:
    """The caps task's answers: SmolLM2-Instruct's own first sentences through its chat template."""
    import torch

    from ..evaluate import load_model, load_tokenizer
    from ..generation import generate
    from .generation_tasks import caps_task, first_sentence

    questions = json.loads((work / "tasks" / "caps" / "questions.json").read_text(encoding="utf-8"))
    path = model_path(config, "smollm2")
    tokenizer, lm = load_tokenizer(path), load_model(path, None, torch.float32)
    chat = _chat(tokenizer, "smollm2")
    texts = [chat.render([{"role": "user", "content": q}]) for q in questions["train"]]
    started = time.perf_counter()
    outs = generate(lm, tokenizer, texts, config.content_tokens, end_ids=chat.end_of_turn_ids(),
                    add_special_tokens=False)  # fmt: skip
    answers = [first_sentence(o.text) for o in outs]
    task = caps_task(questions["train"], answers, questions["eval"])
    written = task.write(work / "tasks" / "caps")
    seconds = round(time.perf_counter() - started, 1)
    return {**written, "answered": sum(a is not None for a in answers), "asked": len(answers), "seconds": seconds,
            "writer": "smollm2 (chat template, greedy)"}  # fmt: skip


def lora_examples(tokenizer: Any, rows: list[dict[str, Any]], chat: Any) -> list[tuple[list[int], int]]:
    """Token ids of each ``prompt + target + end`` and where the target starts (the loss covers target and end).

    Conversations go through ``chat`` (no tokenizer special tokens added: the template writes its
    own) and end with its end-of-turn token; plain prompts take the tokenizer's default special
    tokens and end with EOS.
    """
    examples = []
    for row in rows:
        if "messages" in row:
            prompt = tokenizer(chat.render(row["messages"]), add_special_tokens=False)["input_ids"]
            end = chat.end_of_turn_ids()[0]
        else:
            prompt = tokenizer(row["prompt"])["input_ids"]
            end = tokenizer.eos_token_id
        target = tokenizer(row["target"], add_special_tokens=False)["input_ids"]
        examples.append((list(prompt) + list(target) + [int(end)], len(prompt)))
    return examples


def score_generation(model: Any, tokenizer: Any, base: str, task: str, work: Path, config: GenerationConfig,
                     answers: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """The share of held-out prompts whose greedy answer passes the task's check (with its answers)."""
    from ..generation import GenerationItem, evaluate_generation, make_check
    from .generation_tasks import CHECKS

    rows = read_jsonl(work / "tasks" / task / "eval.jsonl")
    items = [GenerationItem(r, prompt=r.get("prompt"), messages=r.get("messages")) for r in rows]
    chat = _chat(tokenizer, base) if "messages" in rows[0] else None
    result = evaluate_generation(model, tokenizer, items, make_check(CHECKS[task]), chat=chat,
                                 max_new_tokens=config.eval_tokens, progress=False)  # fmt: skip
    if answers is not None:
        atomic_write_text(answers, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in result.answers))
    return {"rate": result.rate, "stderr": result.stderr, "n": result.n, "seconds": round(result.seconds, 1)}


def generic_nll(model: Any, tokenizer: Any, config: GenerationConfig) -> float:
    """Mean NLL on the generic text ``--method distill`` measures by default (standard-library docstrings)."""
    import torch

    from ..distill.generic import mean_nll, stdlib_paragraphs, token_rows
    from ..distill.teaching import GENERIC_TOKENS

    rows = token_rows(tokenizer, stdlib_paragraphs(5 * config.generic_lines, 0)[: config.generic_lines], GENERIC_TOKENS)
    return mean_nll(model, rows, torch.device("cpu"))


def stage_lora(work: Path, config: GenerationConfig, base: str, task: str) -> dict[str, Any]:
    """Score the base, train the task's LoRA on it, score it, measure its side effect, save it."""
    import math

    import torch

    from ..evaluate import load_model, load_tokenizer
    from ..zoo.train import train_lora

    path = model_path(config, base)
    tokenizer, model = load_tokenizer(path), load_model(path, None, torch.float32)
    rows = read_jsonl(work / "tasks" / task / "train.jsonl")
    chat = _chat(tokenizer, base) if "messages" in rows[0] else None
    base_score = score_generation(model, tokenizer, base, task, work, config)
    base_nll = generic_nll(model, tokenizer, config)
    recipe = config.recipes[task]
    started = time.perf_counter()

    def on_step(step: int, _: Any) -> bool:
        if (step + 1) % 25 == 0:
            log.info("lora %s-%s step %d/%d, %.1f s/step", base, task, step + 1, recipe.steps,
                     (time.perf_counter() - started) / (step + 1))  # fmt: skip
        return False

    examples = lora_examples(tokenizer, rows, chat)
    peft_model, logged = train_lora(model, tokenizer, [], recipe, config.lora_seed, on_step, answer_logits_only=True,
                                    examples=examples)  # fmt: skip
    name = f"{base}-{task}"
    peft_model.peft_config["default"].base_model_name_or_path = f"models/{base}"
    peft_model.save_pretrained(str(work / "loras" / name), save_embedding_layers=False)
    score = score_generation(peft_model, tokenizer, base, task, work, config, work / "answers" / f"{name}.jsonl")
    adapter_nll = generic_nll(peft_model, tokenizer, config)
    return {
        "path": f"loras/{name}",
        "base": base,
        "task": task,
        "template": (TEMPLATES[base] or "the tokenizer's own") if chat is not None else None,
        "base_score": base_score,
        "score": score,
        "generic_perplexity_change": math.exp(adapter_nll - base_nll) - 1,
        "train_items": len(examples),
        "train_steps": logged.steps,
        "train_seconds": round(logged.seconds, 1),
        "train_loss_first_last": [logged.losses[0] if logged.losses else None, logged.final_loss],
        "seed": config.lora_seed,
    }


# -- orchestration ------------------------------------------------------------------------------


def stages(config: GenerationConfig) -> list[Stage]:
    out = [Stage("data", stage_data, ()), Stage("content", stage_content, (), ("data",))]
    for task in TASKS:
        for base in BASES:
            needs = ("content",) if task == "caps" else ("data",)
            out.append(Stage(f"lora-{base}-{task}", stage_lora, (base, task), needs))
    return out


def build_generation_assets(
    work: str | os.PathLike[str],
    config: GenerationConfig | None = None,
    only: list[str] | None = None,
    redo: list[str] | None = None,
    workers: int = 1,
    say: Callable[[str], None] = print,
) -> Path:
    """Run every stage without a record under ``work/stages``; write ``work/assets.json`` and return its path."""
    config = config or GenerationConfig()
    for base in BASES:
        if not (model_path(config, base) / "config.json").is_file():
            raise LoraportError(f"{model_path(config, base)}: missing; run python benchmarks/real_assets.py --work "
                                f"{config.real} --only models first")  # fmt: skip
    root = Path(work)
    records, failed = run_stages(root, config, stages(config), only, redo, workers, config.threads, say)
    assets = {"config": config.to_dict(), "stages": records}
    written = atomic_write_text(root / "assets.json", json.dumps(assets, indent=1) + "\n")
    if failed:
        raise LoraportError(f"{len(failed)} stage(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return written


__all__ = [
    "BASES",
    "TASKS",
    "GenerationConfig",
    "build_generation_assets",
    "lora_examples",
    "score_generation",
    "stages",
]
