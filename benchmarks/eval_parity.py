"""Parity of ``loraport.evaluate`` with lm-evaluation-harness on an ARC-format task.

Builds, under a work directory: a byte-level BPE tokenizer trained on the questions
(saved with ``save_pretrained``; with and without a Llama-like BOS), a tiny random Llama
whose vocabulary matches it, a random PEFT LoRA, and ~40 ARC questions whose four choices
have different lengths, with answer keys picked so that ``acc``, ``acc_norm`` and a wrong
normalisation all disagree (see ``pick_answer_keys``). Then scores base and base + LoRA
with lm-eval (``simple_evaluate``, ``model="hf"``, a local YAML task identical to
``arc_challenge`` but reading the JSONL) at batch sizes 1 and 8, and with
``loraport.evaluate.evaluate_path``, and checks acc, acc_norm and every per-choice
log-likelihood agree.

Run (needs the ``eval`` extra, ``pip install -e '.[eval]'``)::

    python benchmarks/eval_parity.py [--workdir DIR] [--questions 40]

Exit status 0 when everything agrees, 1 otherwise. Writes ``benchmarks/results/eval_parity.md``
unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TASK_NAME = "loraport_arc_parity"
LL_TOLERANCE = 1e-4  # per-choice log-likelihood, float32 sums of a few tokens

SUBJECTS = ["a whale", "the moon", "an oak tree", "a copper wire", "the river", "a snowflake", "a volcano", "an ant"]
PROPERTIES = ["is made of", "needs", "is best described as", "changes into", "is mostly", "moves by"]
# Single words of 1 to 14 characters, most of them one BPE token: acc then depends on the
# model, not on the token count, and acc_norm (divided by characters) picks differently; the
# very short ones make dividing by len(choice) and by len(" " + choice) disagree.
ANSWERS = [
    "a",
    "ox",
    "ice",
    "heat",
    "salt",
    "water",
    "gravity",
    "sunlight",
    "magnetism",
    "evaporation",
    "photosynthesis",
]


def make_questions(n: int, seed: int = 0) -> list[dict]:
    """``n`` ARC records, four single-word choices of different lengths; a quarter with digit labels."""
    rng = random.Random(seed)
    questions = []
    for k in range(n):
        texts = rng.sample(ANSWERS, 4)
        labels = ["1", "2", "3", "4"] if k % 4 == 3 else ["A", "B", "C", "D"]
        question = f"Which word fits: {rng.choice(SUBJECTS)} {rng.choice(PROPERTIES)} what?"
        record = {"id": f"q{k}", "question": question, "choices": {"text": texts, "label": labels}}
        record["answerKey"] = labels[0]  # set by pick_answer_keys
        questions.append(record)
    return questions


def make_tokenizer(path: Path, corpus: list[str], vocab_size: int = 400, add_bos: bool = True) -> int:
    """Train a byte-level BPE tokenizer on ``corpus`` and save it; returns its length (ids 0..len-1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=128
    )
    fast.save_pretrained(str(path))
    return len(fast)


def pick_answer_keys(records: list[dict], scores: list[list[float]], n: int, seed: int = 0) -> list[dict]:
    """``n`` of ``records`` with answer keys chosen so that scoring rules disagree visibly.

    ``scores`` (per-choice log-likelihoods) do not depend on the answer key, so setting it
    afterwards is fair. First the questions where argmax ll / len(choice) (lm-eval's acc_norm)
    differs from argmax ll / len(" " + choice), gold = the former; then those where acc and
    acc_norm pick differently, gold = acc's pick; then the rest, gold at random. A wrong
    normalisation, or acc and acc_norm swapped, then moves the accuracies by several questions.
    """
    rng = random.Random(seed)

    def pick(values: list[float]) -> int:
        return max(range(len(values)), key=lambda i: (values[i], -i))  # np.argmax: first of ties

    ranked = []
    for k, (record, lls) in enumerate(zip(records, scores, strict=True)):
        lengths = [len(t) for t in record["choices"]["text"]]
        p_acc = pick(lls)
        p_norm = pick([ll / n_chars for ll, n_chars in zip(lls, lengths, strict=True)])
        p_space = pick([ll / (n_chars + 1) for ll, n_chars in zip(lls, lengths, strict=True)])
        if p_norm != p_space:
            ranked.append((0, k, p_norm))
        elif p_acc != p_norm:
            ranked.append((1, k, p_acc))
        else:
            ranked.append((2, k, rng.randrange(len(lengths))))
    out = []
    for _, k, gold in sorted(sorted(ranked)[:n], key=lambda c: c[1]):
        record = json.loads(json.dumps(records[k]))
        record["answerKey"] = record["choices"]["label"][gold]
        out.append(record)
    return out


def build_fixture(root: Path, questions: int = 40, add_bos: bool = True) -> dict[str, Path]:
    """Model, tokenizer, adapter and ARC JSONL under ``root``; returns their paths."""
    from loraport.evaluate import PROMPT, choice_scores, load_model, load_tokenizer
    from loraport.zoo.tiny import make_random_adapter, make_tiny_model

    pool = make_questions(10 * questions)
    corpus = [PROMPT.format(question=r["question"]) + " " + t for r in pool for t in r["choices"]["text"]]
    model_dir, adapter_dir, data = root / "model", root / "adapter", root / "arc.jsonl"
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(model_dir, corpus, add_bos=add_bos)
    # initializer_range 0.2 gives peaked, not near-uniform, next-token distributions, so
    # choices differ by more than float noise.
    make_tiny_model("llama", model_dir, seed=0, vocab=vocab, hidden=64, layers=2, initializer_range=0.2)
    make_random_adapter(model_dir, adapter_dir, r=8, seed=0)
    scores = choice_scores(load_model(model_dir), load_tokenizer(model_dir), pool, progress=False)
    records = pick_answer_keys(pool, scores, questions)
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {"model": model_dir, "adapter": adapter_dir, "data": data}


def write_task(task_dir: Path, data: Path) -> Path:
    """A local YAML task: arc_challenge's prompt, choices, target and metrics over ``data``."""
    task_dir.mkdir(parents=True, exist_ok=True)
    yaml = f"""task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files: {json.dumps(str(data))}
output_type: multiple_choice
test_split: train
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    (task_dir / f"{TASK_NAME}.yaml").write_text(yaml, encoding="utf-8")
    return task_dir


def run_lm_eval(model: Path, data: Path, task_dir: Path, adapter: Path | None, batch_size: int) -> dict:
    """acc, acc_norm and per-question choice log-likelihoods (in document order) from lm-eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_task(task_dir, data)
    try:
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    except TypeError:  # lm-eval < 0.4.10 always indexes its own tasks
        manager = TaskManager(include_path=str(task_dir))
    model_args = f"pretrained={model},dtype=float32" + (f",peft={adapter}" if adapter else "")
    started = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[TASK_NAME],
        batch_size=batch_size,
        device="cpu",
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    seconds = time.perf_counter() - started
    metrics = out["results"][TASK_NAME]
    samples = sorted(out["samples"][TASK_NAME], key=lambda s: s["doc_id"])
    lls = [[float(resp[0][0]) for resp in s["resps"]] for s in samples]
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "lls": lls, "seconds": seconds}


def run_loraport(model: Path, data: Path, adapter: Path | None, batch_size: int) -> dict:
    from loraport.evaluate import choice_scores, evaluate_path, load_arc_jsonl, load_model, load_tokenizer

    result = evaluate_path(str(model), str(data), adapter=str(adapter) if adapter else None, batch_size=batch_size)
    lls = choice_scores(load_model(model, adapter), load_tokenizer(model), load_arc_jsonl(data), batch_size)
    return {"acc": result.acc, "acc_norm": result.acc_norm, "lls": lls, "seconds": result.seconds}


def compare(ours: dict, theirs: dict) -> tuple[bool, float]:
    """Equal acc and acc_norm, and every log-likelihood within ``LL_TOLERANCE``; returns (ok, max |diff|)."""
    diff = max(
        abs(a - b) for qa, qb in zip(ours["lls"], theirs["lls"], strict=True) for a, b in zip(qa, qb, strict=True)
    )
    same = ours["acc"] == theirs["acc"] and ours["acc_norm"] == theirs["acc_norm"]
    return same and diff <= LL_TOLERANCE, diff


def parity_rows(
    root: Path, questions: int = 40, batch_sizes: tuple[int, ...] = (1, 8), add_bos: bool = True
) -> list[dict]:
    """Every (adapter or not, batch size) comparison on one fixture built under ``root``."""
    paths = build_fixture(root, questions, add_bos)
    rows = []
    for adapter in (None, paths["adapter"]):
        for batch_size in batch_sizes:
            theirs = run_lm_eval(paths["model"], paths["data"], root / "task", adapter, batch_size)
            ours = run_loraport(paths["model"], paths["data"], adapter, batch_size)
            ok, diff = compare(ours, theirs)
            rows.append(
                {
                    "model": "base + LoRA" if adapter else "base",
                    "bos": add_bos,
                    "batch_size": batch_size,
                    "lm_eval": theirs,
                    "loraport": ours,
                    "max_ll_diff": diff,
                    "ok": ok,
                }
            )
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| model | BOS | batch | lm-eval acc | ours acc | lm-eval acc_norm | ours acc_norm | max abs LL diff | agree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'yes' if r['bos'] else 'no'} | {r['batch_size']} | {r['lm_eval']['acc']:.4f} | "
            f"{r['loraport']['acc']:.4f} | {r['lm_eval']['acc_norm']:.4f} | {r['loraport']['acc_norm']:.4f} | "
            f"{r['max_ll_diff']:.2e} | {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where to build the fixture (default: a temp dir)")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/eval_parity.md")
    args = parser.parse_args(argv)
    import lm_eval
    import torch

    torch.set_num_threads(1)  # tiny matmuls: more threads only add contention on a shared CPU

    with tempfile.TemporaryDirectory(prefix="loraport-eval-parity-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        rows = parity_rows(root / "bos", args.questions, add_bos=True)
        rows += parity_rows(root / "nobos", args.questions, add_bos=False)
    table = format_rows(rows)
    print(table)
    ok = all(r["ok"] for r in rows)
    print("PARITY OK" if ok else "PARITY FAILED")
    if not args.no_write:
        out = Path(__file__).parent / "results" / "eval_parity.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        import transformers

        out.write_text(
            f"# Evaluation parity with lm-evaluation-harness\n\n"
            f"`python benchmarks/eval_parity.py --questions {args.questions}`: lm-eval {lm_eval.__version__}, "
            f"transformers {transformers.__version__}, torch {torch.__version__}, CPU, float32; a tiny random "
            f"Llama with a byte-level BPE tokenizer (with and without a BOS), {args.questions} ARC questions "
            f"with four single-word choices each; answer keys picked (from the base model's scores) so that "
            f"dividing by len(choice) or by len(' ' + choice) changes acc_norm. The last column is the largest "
            f"per-choice log-likelihood difference.\n\n{table}\n",
            encoding="utf-8",
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
