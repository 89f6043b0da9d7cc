"""Memory and time of one distillation student step at Qwen2.5-1.5B and Qwen2.5-7B shapes, and a 7B GPU projection.

    python benchmarks/distill_scale.py            # both shapes, every variant: benchmarks/results/distill_scale.md
    python benchmarks/distill_scale.py --quick    # multiple-choice batches, three variants

One step is what ``loraport.distill.train.train_student`` does: ``batch_loss`` of 16 texts
(NLL of the continuation over the whole vocabulary + sparse KL over a ~45,000-token support at
the aligned positions) + 0.5 * ``keep_loss`` on 4 generic lines of 48 tokens, backward, gradient
clipping, AdamW on the LoRA factors (rank 16 on the seven projections). The models are built
from ``transformers`` configs of the real shapes with random weights (time and memory do not
depend on the values), at two depths each; ``time(L) = a + b L`` and ``memory(L) = c + d L``
through the two points give the full 28-layer figures: extrapolations, not measurements.
Each (shape, case, variant, depth) runs in its own process with one torch thread: the first
step is a warm-up, the median of the rest is reported; the peak RSS of the steps is the
process's own (``VmHWM`` reset after the model is built). The bytes autograd saves for the
backward pass are counted with saved-tensor hooks on the first step (parameters excluded):
the activation memory, whichever device runs it.

Cases: ``mc`` (multiple-choice: prompts of 24-32 tokens + 6 continuation tokens, KL at the 7
answer positions) and ``chat`` (prompts of 36-44 tokens + 60 continuation tokens, KL at 61).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path("benchmarks/results")
RANK, TOP_K, BATCH, KEEP_LINES, KEEP_TOKENS, KEEP_WEIGHT, SUPPORT = 16, 64, 16, 4, 48, 0.5, 45_000
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
FULL_LAYERS = 28
GIB = 2**30

# The real shapes (Qwen2 configs); the depth is set per run.
SHAPES: dict[str, dict] = {
    "qwen2.5-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One way to run the step: autocast dtype, weight dtype, activation checkpointing, LoRA layers, backward."""

    label: str
    autocast: bool = False
    bf16_weights: bool = False
    checkpointing: bool = False
    upper: bool = False
    backward: bool = True


VARIANTS = {
    "fp32": Variant("float32 (baseline)"),
    "autocast": Variant("bf16 autocast", autocast=True),
    "bf16-weights": Variant("bf16 base weights, fp32 LoRA", bf16_weights=True),
    "checkpointing": Variant("float32 + activation checkpointing", checkpointing=True),
    "bf16-checkpointing": Variant(
        "bf16 base weights + activation checkpointing", bf16_weights=True, checkpointing=True
    ),
    "upper": Variant("float32, LoRA on the upper half", upper=True),
    "forward": Variant("forward only, no grad (a teacher's prefill)", backward=False),
}


@dataclass(frozen=True)
class Case:
    """Synthetic texts: prompt lengths ``prompt + i % spread`` and a continuation of ``continuation`` tokens."""

    prompt: int
    spread: int
    continuation: int


CASES = {"mc": Case(24, 9, 6), "chat": Case(36, 9, 60)}
CASE_VARIANTS = {"mc": tuple(VARIANTS), "chat": ("fp32", "bf16-weights", "bf16-checkpointing")}
QUICK_VARIANTS = ("fp32", "bf16-weights", "checkpointing")
DEPTHS = {"qwen2.5-1.5b": (2, 4), "qwen2.5-7b": (1, 2)}
# A smaller batch where batch 16 passes the RSS cap (in a trial: 7B chat, bf16 weights, 2 layers)
BATCHES = {("qwen2.5-7b", "chat"): 8}
# Runs left out, and why (seen in a trial run on this machine).
SKIP = {
    ("qwen2.5-7b", "chat", "fp32"): "not run: at batch 16 and 2 layers its RSS passed the 10 GiB cap in a trial "
    "(float32 weights 7.0 GiB, then the full-vocabulary logits of 960 continuation positions and their gradients); "
    "at batch 8, left out for time (a step of about a minute)",
}

# Assumptions of the projection (not measured here).
GPUS = {  # name: (usable memory GiB, dense bf16 tensor TFLOPS with fp32 accumulate, fp32 non-tensor TFLOPS)
    "RTX 4090": (24.0, 165.2, 82.6),
    "A10": (22.5, 125.0, 31.2),
}
EFFICIENCY = 0.40  # sustained share of peak
STEPS = (100, 200)  # steps of a real-model port
EVAL_TEXTS, EVAL_EVERY = 164, 10  # held-out + probe texts evaluated every 10 steps (forward only)
CUDA_OVERHEAD_GIB = 1.0  # CUDA context and allocator slack


# -- the child: one measured process ----------------------------------------------------------------


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _watch(cap_mib: float) -> None:
    """Stop the process (one JSON line with the reason) when its RSS passes ``cap_mib``; allocations past
    ``cap_mib`` less 0.5 GiB of private data fail at once (an RSS poll can miss one large allocation)."""
    import resource

    limit = int((cap_mib - 512) * 2**20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    def loop() -> None:
        while True:
            rss = _status("VmRSS")
            if rss > cap_mib:
                print(json.dumps({"error": f"stopped: RSS {rss:.0f} MiB passed the {cap_mib:.0f} MiB cap"}), flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=loop, daemon=True).start()


def batch_tokens(case: Case, batch: int) -> dict[str, int]:
    """Token counts of a batch of ``case`` (as :func:`synthetic_batch` makes it): texts, padded width, continuation
    positions, KL positions, keep-line tokens and their scored positions."""
    prompts = [case.prompt + i % case.spread for i in range(batch)]
    return {"batch": batch, "width": max(prompts) + case.continuation, "seq": batch * case.continuation,
            "kl": batch * (case.continuation + 1), "keep": KEEP_LINES * KEEP_TOKENS,
            "keep_scored": KEEP_LINES * (KEEP_TOKENS - 1)}  # fmt: skip


def synthetic_batch(case: Case, batch: int, vocab: int, support: int, seed: int = 0) -> tuple[list, list]:
    """``batch`` student samples of ``case`` and ``KEEP_LINES`` keep lines, random ids (as a port's batch)."""
    import torch

    from loraport.distill.student import KeepSample, StudentSample

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(batch):
        prompt, cont = case.prompt + i % case.spread, case.continuation
        length = prompt + cont
        ids = torch.randint(10, vocab, (length,), generator=gen).tolist()
        kl_positions = torch.arange(prompt - 1, length)  # the answer positions (across tokenizers)
        top = torch.randint(0, support, (len(kl_positions), TOP_K), generator=gen)
        logprobs = torch.log_softmax(torch.randn(len(kl_positions), TOP_K, generator=gen), -1)
        seq_positions = torch.arange(prompt - 1, length - 1)
        samples.append(StudentSample(ids, kl_positions, top, logprobs, seq_positions, torch.tensor(ids[prompt:])))
    keep = []
    for _ in range(KEEP_LINES):
        ids = torch.randint(10, vocab, (KEEP_TOKENS,), generator=gen).tolist()
        top = torch.randint(0, support, (KEEP_TOKENS - 1, TOP_K), generator=gen)
        keep.append(KeepSample(ids, top, torch.log_softmax(torch.randn(KEEP_TOKENS - 1, TOP_K, generator=gen), -1)))
    return samples, keep


class SavedBytes:
    """Bytes autograd saves for the backward pass (distinct storages, parameters excluded)."""

    def __init__(self, model) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def random_model(config, dtype):
    """A causal LM of ``config`` with random weights, fast: built on the meta device, then each parameter
    filled from one random tile (N(0, 0.02); norms 1, biases 0). ``transformers``' own initialisation
    draws every value and takes half a minute at the 7B shape; the step's time and memory do not depend
    on the values."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    tile = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.view(-1)
            if name.endswith("norm.weight"):
                flat.fill_(1.0)
            elif name.endswith(".bias"):
                flat.zero_()
            else:
                for start in range(0, flat.numel(), tile.numel()):
                    chunk = flat[start : start + tile.numel()]
                    chunk.copy_(tile[: chunk.numel()])
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers were on meta
    return model


def child(spec: dict) -> dict:
    """One run: build the model of ``spec``'s shape and depth, wrap it, time ``spec['steps']`` steps."""
    import torch

    torch.set_num_threads(1)
    _watch(spec["cap_mib"])
    from transformers import Qwen2Config

    from loraport.distill.student import base_model, batch_loss, build_student, head_rows, keep_loss, lora_parameters

    variant, case, layers = VARIANTS[spec["variant"]], CASES[spec["case"]], spec["layers"]
    shape = SHAPES[spec["shape"]]
    config = Qwen2Config(**shape, num_hidden_layers=layers, use_cache=False, rope_theta=1e6, rms_norm_eps=1e-6)
    dtype = torch.bfloat16 if variant.bf16_weights else torch.float32
    torch.manual_seed(0)
    started = time.perf_counter()
    model = random_model(config, dtype)
    if variant.checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant; makes the embeddings' output require grad
    lowest = layers // 2 if variant.upper else 0
    modules = [f"model.layers.{i}.{m}" for i in range(lowest, layers) for m in PROJECTIONS]
    student, _ = build_student(model, modules, RANK, 2 * RANK, False, {}, 0)
    params = lora_parameters(student)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith(".B"):
                p.normal_(std=1e-3)  # a trained state, not PEFT's zero start
    vocab = config.vocab_size
    support = torch.linspace(0, vocab - 1, SUPPORT).long()
    rows = head_rows(base_model(student), support)
    samples, keep = synthetic_batch(case, spec["batch"], vocab, SUPPORT)
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.0, foreach=False)
    autocast = torch.bfloat16 if variant.autocast else None
    device = torch.device("cpu")
    student.train(variant.backward)
    build_seconds = time.perf_counter() - started
    ready_mib = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the steps alone
    saved = SavedBytes(student)
    times = []
    for step in range(spec["steps"]):
        t0 = time.perf_counter()
        if not variant.backward:
            with torch.no_grad():
                batch_loss(student, samples, 0, rows, (1.0, 1.0), device, autocast)
                keep_loss(student, keep, 0, device, autocast, rows)
        else:
            hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
            with hooks if step == 0 else contextlib.nullcontext():
                loss, _ = batch_loss(student, samples, 0, rows, (1.0, 1.0), device, autocast)
                loss = loss + KEEP_WEIGHT * keep_loss(student, keep, 0, device, autocast, rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    width = max(len(s.ids) for s in samples)
    held = 0  # a checkpointed layer holds its input, out of the hooks' sight: once for the batch, once for keep
    if variant.checkpointing:
        held = layers * (len(samples) * width + KEEP_LINES * KEEP_TOKENS) * config.hidden_size * dtype.itemsize
    return {
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "times": times,
        "build_s": build_seconds,
        "ready_mib": ready_mib,
        "peak_mib": _status("VmHWM"),
        "saved_mib": (saved.total + held) / 2**20 if variant.backward else None,
        "lora_dtype": str(next(iter(params.values())).dtype).removeprefix("torch."),
        "lora_params": sum(p.numel() for p in params.values()),
        "tokens": {"batch": len(samples), "width": width, "seq": sum(len(s.seq_ids) for s in samples),
                   "kl": sum(len(s.kl_positions) for s in samples), "keep": KEEP_LINES * KEEP_TOKENS,
                   "keep_scored": KEEP_LINES * (KEEP_TOKENS - 1)},
    }  # fmt: skip


# -- FLOPs -----------------------------------------------------------------------------------------


def shape_params(shape: dict) -> dict[str, float]:
    """Parameter counts: one decoder layer's projections, the embeddings and the head."""
    d, inter, heads, kv = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_key_value_heads"))  # fmt: skip
    head_dim = d // heads
    attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim + (heads + 2 * kv) * head_dim  # + q/k/v biases
    layer = attention + 3 * d * inter + 2 * d  # + two norms
    vocab = shape["vocab_size"] * d
    return {"layer": layer, "embed": vocab, "head": 0 if shape["tie_word_embeddings"] else vocab}


def step_flops(shape: dict, tokens: dict, layers: int, variant: Variant) -> dict[str, float]:
    """FLOPs of one step: ``decoder`` (projections + attention) and ``head`` (the scored positions).

    Forward of a linear: ``2 * params * tokens``; backward through it with the base frozen: the input's
    gradient only, the same again (LoRA gradients: negligible); attention scores and mixing:
    ``4 * width^2 * hidden`` per text forward, twice that backward. Checkpointing adds a forward of
    every trained layer; ``upper`` runs the lower half forward only.
    """
    d = shape["hidden_size"]
    per_layer = shape_params(shape)["layer"] - 2 * d
    linear = 2 * per_layer * (tokens["batch"] * tokens["width"] + tokens["keep"])
    attention = 4 * d * (tokens["batch"] * tokens["width"] ** 2 + KEEP_LINES * KEEP_TOKENS**2)
    if not variant.backward:
        decoder = layers * (linear + attention)
    else:
        trained = layers - layers // 2 if variant.upper and not variant.checkpointing else layers
        recompute = 1 if variant.checkpointing else 0
        decoder = (layers - trained) * (linear + attention) + trained * (
            (2 + recompute) * linear + (3 + recompute) * attention
        )
    head_fwd = 2 * d * (tokens["seq"] * shape["vocab_size"] + (tokens["kl"] + tokens["keep_scored"]) * SUPPORT)
    head = head_fwd * (2 if variant.backward else 1)
    return {"decoder": decoder, "head": head, "total": decoder + head}


# -- the parent: runs, fits, projection, Markdown -------------------------------------------------------


def run_one(spec: dict, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return {**spec, **json.loads(lines[-1])}
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {**spec, "error": f"exit {done.returncode}: {tail}"}


def fit(rows: list[dict], key: str) -> tuple[float, float] | None:
    """``(fixed, per layer)`` through the two depths' ``key`` (None if one is missing)."""
    points = sorted((r["layers"], r[key]) for r in rows if r.get(key) is not None)
    if len(points) < 2:
        return None
    (l1, y1), (l2, y2) = points[0], points[-1]
    slope = (y2 - y1) / (l2 - l1)
    return y1 - slope * l1, slope


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def measured_table(results: list[dict]) -> list[str]:
    out = ["| shape | case | variant | layers | batch | step (s) | steps (s) | ready RSS (MiB) | step peak RSS (MiB) | "
           "peak - ready (MiB) | saved for backward (MiB) | padded tokens | CPU GFLOP/s |",
           "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        head = f"| {r['shape']} | {r['case']} | {r['variant']} | {r['layers']} | {r.get('batch', BATCH)} |"
        if "error" in r:
            out.append(f"{head} {r['error']} | | | | | | | |")
            continue
        flops = step_flops(SHAPES[r["shape"]], r["tokens"], r["layers"], VARIANTS[r["variant"]])["total"]
        steps = ", ".join(f"{t:.1f}" for t in r["times"])
        out.append(f"{head} {r['step_s']:.1f} | {steps} | {r['ready_mib']:,.0f} | {r['peak_mib']:,.0f} | "
                   f"{r['peak_mib'] - r['ready_mib']:,.0f} | {_f(r['saved_mib'], 0)} | "
                   f"{r['tokens']['batch'] * r['tokens']['width']} | {flops / r['step_s'] / 1e9:.0f} |")  # fmt: skip
    return out


def extrapolations(results: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Per (shape, case, variant): the fits and the 28-layer values."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["shape"], r["case"], r["variant"]), []).append(r)
    out = {}
    for key, rows in groups.items():
        for r in rows:
            r["delta_mib"] = r["peak_mib"] - r["ready_mib"]
        fits = {name: fit(rows, name) for name in ("step_s", "peak_mib", "delta_mib", "saved_mib")}
        full = {name: (f[0] + FULL_LAYERS * f[1] if f else None) for name, f in fits.items()}
        transient = max((r["delta_mib"] - r["saved_mib"]) / 1024 if r.get("saved_mib") is not None else 0.0
                        for r in rows)  # fmt: skip
        out[key] = {
            "transient_gib": max(0.0, transient),
            "fits": fits,
            "full": full,
            "depths": sorted(r["layers"] for r in rows),
            "tokens": rows[0]["tokens"],
            "batch": rows[0]["tokens"]["batch"],
        }
    return out


def extrapolated_table(ext: dict) -> list[str]:
    out = ["| shape | case | variant | depths | s / layer | fixed s | step at 28 layers (s) | vs fp32 | "
           "step-peak RSS MiB / layer | peak RSS at 28 (GiB) | saved MiB / layer | saved fixed (MiB) | "
           "saved at 28 (GiB) |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (shape, case, variant), e in ext.items():
        fits, full = e["fits"], e["full"]
        base = ext.get((shape, case, "fp32"), {}).get("full", {}).get("step_s")
        ratio = f"{full['step_s'] / base:.2f}x" if base and full["step_s"] else "-"
        t, s, m = fits["step_s"], fits["saved_mib"], fits["delta_mib"]
        peak, saved = full["peak_mib"], full["saved_mib"]
        batch = f" (batch {e['batch']})" if e["batch"] != BATCH else ""
        out.append(
            f"| {shape} | {case} | {variant} | {'+'.join(map(str, e['depths']))}{batch} | {_f(t and t[1])} | "
            f"{_f(t and t[0])} | {_f(full['step_s'])} | {ratio} | {_f(m and m[1], 0)} | {_f(peak and peak / 1024)} | "
            f"{_f(s and s[1], 0)} | {_f(s and s[0], 0)} | {_f(saved and saved / 1024)} |"
        )
    return out


def flops_table(ext: dict) -> list[str]:
    out = [f"| shape | case | variant | decoder TFLOP / step | head TFLOP / step | total TFLOP / step | "
           f"CPU step at 28 layers, batch {BATCH} (s, extrapolated) |",
           "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for (shape, case, variant), e in ext.items():
        f = step_flops(SHAPES[shape], batch_tokens(CASES[case], BATCH), FULL_LAYERS, VARIANTS[variant])
        cpu = e["full"]["step_s"] and e["full"]["step_s"] * BATCH / e["batch"]
        scaled = f" (batch {e['batch']} x {BATCH / e['batch']:g})" if e["batch"] != BATCH else ""
        out.append(f"| {shape} | {case} | {variant} | {f['decoder'] / 1e12:.2f} | {f['head'] / 1e12:.2f} | "
                   f"{f['total'] / 1e12:.2f} | {_f(cpu)}{scaled} |")  # fmt: skip
    return out


def gpu_projection(ext: dict, shape_name: str = "qwen2.5-7b") -> list[str]:
    """Memory and time of a full-depth port of ``shape_name`` on a 24 GB GPU (bf16 weights, batch 16)."""
    shape = SHAPES[shape_name]
    counts = shape_params(shape)
    d = shape["hidden_size"]
    total_params = FULL_LAYERS * counts["layer"] + counts["embed"] + counts["head"] + d
    weights = 2 * total_params / GIB
    lora = _lora_params(shape) * 16 / GIB  # fp32 factors, their gradients, two AdamW moments
    rows = SUPPORT * d * 2 / GIB  # the support's head rows, bf16
    static = weights + lora + rows + CUDA_OVERHEAD_GIB
    # head_logits casts the head (or the support rows, once per loss) to float32 and autograd keeps the copy
    head_copies = (shape["vocab_size"] + 2 * SUPPORT) * d * 4 / GIB
    out = [f"Weights: {total_params / 1e9:.2f} B parameters in bf16 = **{weights:.1f} GiB** "
           f"({2 * total_params / 1e9:.1f} GB); LoRA rank {RANK} on the seven projections of 28 layers: "
           f"{_lora_params(shape) / 1e6:.0f} M parameters, with gradients and AdamW moments {lora:.2f} GiB; support "
           f"rows {rows:.2f} GiB; CUDA context and slack {CUDA_OVERHEAD_GIB:.1f} GiB (assumed): static "
           f"**{static:.1f} GiB**.", ""]  # fmt: skip
    table = ["| case | measured at | saved: fixed (GiB) | of which fp32 head copies | saved / layer (MiB) | "
             "transient (GiB) | no checkpointing (GiB) | checkpointing (GiB) | "
             + " | ".join(f"fits {g} ({m:g} GiB): plain / ckpt | largest batch {g}: plain / ckpt"
                          for g, (m, _, _) in GPUS.items()) + " |",
             "|---|---|---:|---:|---:|---:|---:|---:|" + "---|---|" * len(GPUS)]  # fmt: skip
    times = ["| case | GPU | decoder TFLOP / step | head TFLOP / step | s / step (head fp32, as coded) | "
             "s / step (head bf16) | " + " | ".join(f"{n} steps (min)" for n in STEPS)
             + " | " + " | ".join(f"{n} steps + evaluations (min)" for n in STEPS) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * (2 * len(STEPS))]  # fmt: skip
    for case in CASES:
        e = ext.get((shape_name, case, "bf16-weights"))
        if not e or not e["fits"]["saved_mib"]:
            table.append(f"| {case} | (no bf16-weights runs at two depths) |" + " |" * (6 + 2 * len(GPUS)))
            continue
        scale = BATCH / e["batch"]  # runs at a smaller batch: activations taken as proportional to it
        fixed, per_layer = (scale * x / 1024 for x in e["fits"]["saved_mib"])  # GiB
        tokens = batch_tokens(CASES[case], BATCH)
        transient = scale * e["transient_gib"]
        plain_act = fixed + FULL_LAYERS * per_layer + transient
        layer_input = (tokens["batch"] * tokens["width"] + tokens["keep"]) * d * 2 / GIB  # bf16, kept per layer
        ckpt_act = fixed + FULL_LAYERS * layer_input + per_layer + transient  # one layer recomputed at a time
        cells = []
        for memory, _, _ in GPUS.values():
            fits_ = "/".join("yes" if static + a <= memory else "no" for a in (plain_act, ckpt_act))
            largest = "/".join(str(max(0, int(BATCH * (memory - static) / a))) for a in (plain_act, ckpt_act))
            cells += [fits_, largest]
        table.append(
            f"| {case} | {'+'.join(map(str, e['depths']))} layers, batch {e['batch']} | {fixed:.2f} | "
            f"{head_copies:.2f} | "
            f"{per_layer * 1024:,.0f} | {transient:.2f} | {static + plain_act:.1f} | {static + ckpt_act:.1f} | "
            + " | ".join(cells)
            + " |"
        )
        f = step_flops(shape, tokens, FULL_LAYERS, VARIANTS["bf16-weights"])
        eval_flops = EVAL_TEXTS / BATCH * step_flops(shape, tokens, FULL_LAYERS, VARIANTS["forward"])["total"]
        for gpu, (_, bf16_peak, fp32_peak) in GPUS.items():
            bf16_rate, fp32_rate = EFFICIENCY * bf16_peak * 1e12, EFFICIENCY * fp32_peak * 1e12
            as_coded = f["decoder"] / bf16_rate + f["head"] / fp32_rate
            evals = eval_flops / bf16_rate / EVAL_EVERY  # per step
            minutes = [f"{n * as_coded / 60:.1f}" for n in STEPS] + [
                f"{n * (as_coded + evals) / 60:.1f}" for n in STEPS
            ]
            times.append(f"| {case} | {gpu} | {f['decoder'] / 1e12:.1f} | {f['head'] / 1e12:.2f} | {as_coded:.2f} | "
                         f"{f['total'] / bf16_rate:.2f} | " + " | ".join(minutes) + " |")  # fmt: skip
    return [*out, *table, "", *times]


def _lora_params(shape: dict) -> int:
    d, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = d // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    pairs = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]
    return FULL_LAYERS * RANK * sum(a + b for a, b in pairs)


def machine() -> str:
    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores (shared with other jobs: load average {load[0]:.1f} at the end), "
            f"one torch thread per run; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}; no GPU")  # fmt: skip


def markdown(results: list[dict], command: str, seconds: float) -> str:
    ext = extrapolations(results)
    failed = [r for r in results if "error" in r]
    lines = [
        "# Distillation student at Qwen2.5-1.5B and Qwen2.5-7B shapes: memory, step time, and a 7B GPU projection",
        "",
        f"Command: `{command}` ({seconds / 60:.0f} min). Machine: {machine()}.",
        "",
        "Each run builds a Qwen2 model of the real shape (random weights: time and memory do not depend on the "
        f"values) at a reduced depth, wraps it in a rank-{RANK} PEFT LoRA on q, k, v, o, gate, up, down of every "
        f"layer (`build_student`), and times the training step of `train_student`: `batch_loss` of {BATCH} texts "
        f"(NLL of the continuation over the whole vocabulary + sparse KL, top {TOP_K}, over a {SUPPORT:,}-token "
        f"support at the answer positions) + {KEEP_WEIGHT} * `keep_loss` on {KEEP_LINES} lines of {KEEP_TOKENS} "
        "tokens, backward, gradient clipping, AdamW on the LoRA factors. Cases: **mc** (prompts of 24-32 tokens + "
        "6 continuation tokens, KL at 7 positions each) and **chat** (prompts of 36-44 tokens + 60 continuation "
        "tokens, KL at 61). Each row is its own process; the first step is a warm-up and *step* is the median of "
        "the rest (all steps listed). *Ready RSS*: after the model, LoRA, support rows and optimizer exist; "
        "*step peak RSS*: the peak during the steps (VmHWM reset at ready); *saved for backward*: the bytes of the "
        "distinct tensors autograd saved on the first step (saved-tensor hooks; parameters excluded; "
        "with checkpointing the layers' own saves are hidden from the hooks, and the column adds what each "
        "checkpointed layer keeps: its input). "
        "*CPU GFLOP/s*: the FLOP model below over the measured step. The machine was shared with other "
        "benchmarks, so the times are upper bounds of an idle 2-core machine's.",
        "",
        "## Measured",
        "",
        *measured_table(results),
        "",
    ]
    if failed:
        lines += ["Rows without numbers: " + "; ".join(
            f"{r['shape']} {r['case']} {r['variant']} at {r['layers']} layers: {r['error']}" for r in failed) + ".",
            ""]  # fmt: skip
    lines += [
        "## Extrapolated to 28 layers (from the two measured depths: not measured)",
        "",
        "time(L) = a + b L and memory(L) = c + d L through the two depths of each row; the 28-layer columns are "
        "those lines at L = 28. 1.5B: 2 and 4 layers; 7B: **1 and 2 layers** (4 layers of the 7B shape in float32 "
        "hold 7.5 GiB of weights alone, against the runs' 10 GiB RSS cap, and a chat step takes minutes here). "
        "*Step-peak RSS / layer*: the slope of (step peak - ready); *saved*: of saved for backward.",
        "",
        *extrapolated_table(ext),
        "",
        "## FLOPs per step (model, at 28 layers)",
        "",
        "Forward of a linear: 2 x parameters x tokens (padded: the batch is left-padded to its longest text; "
        "the keep lines too). Backward with the base frozen: only the inputs' gradients, as many FLOPs again "
        "(LoRA gradients negligible). Attention: 4 x width^2 x hidden per text forward, twice that backward. "
        "Checkpointing: one more forward of every layer. *upper*: the lower half forward only. Head: 2 x hidden "
        "x (continuation positions x vocabulary + (KL positions + keep positions) x support) forward, the same "
        "again backward (the head frozen).",
        "",
        *flops_table(ext),
        "",
        "## Projection: a full 7B port (Qwen2.5-7B shape) on one 24 GiB GPU",
        "",
        "Measured (on CPU, this code): the fixed and per-layer activation bytes (*saved for backward* of the "
        "bf16-weights runs, fitted over the two depths) and the *transient* (the largest step peak - ready - saved "
        "of those runs: logits' gradients and other temporaries of the backward pass), the token counts. Assumed: "
        "bf16 weights on the GPU (the code today loads the student and the teacher in float32 on every device: see "
        "the notes), a GPU saving the same tensors as the CPU kernels (CUDA's fused attention saves less), the "
        "static part below. With checkpointing: each layer keeps only its bf16 input, plus one layer's activations "
        "during its recompute. *Largest batch*: the batch whose activations (fixed + layers + transient, taken as "
        "proportional to the batch) fill what the static part leaves.",
        "",
        *gpu_projection(ext),
        "",
        f"Time: FLOPs / ({EFFICIENCY:.0%} of the assumed peak). Peaks (dense, from the vendors' sheets, assumed): "
        + "; ".join(f"{g}: {b} TFLOPS bf16 tensor, {f} TFLOPS fp32" for g, (_, b, f) in GPUS.items())
        + ". *As coded*: `batch_loss` and `keep_loss` apply the output head outside autocast, in float32 "
        "(`hidden.float()`), which a GPU without TF32 runs at its fp32 rate; *head bf16*: all at the bf16 rate. "
        f"Steps: a real-model port is assumed to need {STEPS[0]}-{STEPS[1]} steps (assumption); *with evaluations*: "
        f"plus a forward pass over {EVAL_TEXTS} held-out and probe texts every {EVAL_EVERY} steps (assumed counts). "
        "Not included: the teacher's generation (the source model, the same size, memory-bound decoding) and loading.",
        "",
        "## Notes",
        "",
        *notes(ext),
        "",
    ]
    return "\n".join(lines)


def notes(ext: dict) -> list[str]:
    """What the numbers say about the code (each with the figures it rests on)."""
    shape = SHAPES["qwen2.5-7b"]
    d, vocab = shape["hidden_size"], shape["vocab_size"]
    fp32_7b = 4 * (FULL_LAYERS * shape_params(shape)["layer"] + 2 * vocab * d) / GIB
    out = [
        f"- **float32 loading.** `Distiller` (distill/distiller.py), `distill/multi.py` and the teacher "
        f"(distill/teaching.py) load their models with `load_causal_lm(torch.float32)` on every device; "
        f"`precision=auto` adds bf16 autocast on CUDA but keeps the float32 weights: {fp32_7b:.1f} GiB for the 7B "
        "shape, more than a 24 GB GPU holds before any activation. The projection assumes bf16 weights (the "
        "bf16-weights rows: PEFT keeps the LoRA factors in float32 there, as `lora_dtype` in the JSON shows).",
        f"- **float32 head copies.** `head_logits` multiplies by `weight.mT.to(hidden.dtype)` with float32 hidden "
        "states: with bf16 weights that is a float32 copy of the whole head for the continuation's NLL "
        f"({vocab * d * 4 / GIB:.2f} GiB at 7B) and of the support rows for each of the two KLs "
        f"({SUPPORT * d * 4 / GIB:.2f} GiB each), all kept for the backward pass, and the head's matmuls run "
        "at the float32 rate. Computing the logits in bf16 (`hidden.to(weight.dtype) @ weight.mT`, then "
        "`.float()`) or in chunks of positions would drop them.",
    ]
    for shape_name in SHAPES:
        for case in CASES:
            auto, base = ext.get((shape_name, case, "autocast")), ext.get((shape_name, case, "fp32"))
            if auto and base and auto["fits"]["saved_mib"] and base["fits"]["saved_mib"]:
                extra = auto["fits"]["saved_mib"][1] - base["fits"]["saved_mib"][1]
                layer_bf16 = 2 * shape_params(SHAPES[shape_name])["layer"] / 2**20
                found = extra > layer_bf16  # each weight is used twice a step: the batch, the keep lines
                out.append(
                    f"- **autocast and frozen weights** ({shape_name}, {case}): saved / layer {extra:+,.0f} MiB "
                    f"against float32, where one layer's weights in bf16 are {layer_bf16:,.0f} MiB. "
                    + ("Autocast caches its bf16 casts only of weights that require grad: the frozen base's are "
                       "cast again at each of their two uses a step (the batch, the keep lines) and each copy is "
                       "kept for the backward pass." if found else "No sign of kept bf16 weight copies.")
                )  # fmt: skip
    return out


def plan(args: argparse.Namespace) -> list[dict]:
    """The runs: every shape, case and variant at its two depths (``--quick``: mc, three variants)."""
    specs = []
    for shape in args.shapes.split(","):
        for case in ("mc",) if args.quick else args.cases.split(","):
            for variant in QUICK_VARIANTS if args.quick else CASE_VARIANTS[case]:
                steps = args.chat_steps if case == "chat" else args.steps
                if (shape, case, variant) in SKIP:
                    specs.append({"shape": shape, "case": case, "variant": variant,
                                  "layers": " and ".join(map(str, DEPTHS[shape]))})  # fmt: skip
                    continue
                for layers in DEPTHS[shape]:
                    batch = BATCHES.get((shape, case), BATCH)
                    specs.append({"shape": shape, "case": case, "variant": variant, "layers": layers, "steps": steps,
                                  "batch": batch, "cap_mib": args.cap_gib * 1024})  # fmt: skip
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="mc batches, fp32 / bf16-weights / checkpointing only")
    parser.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-7b")
    parser.add_argument("--cases", default="mc,chat")
    parser.add_argument("--steps", type=int, default=3, help="steps per mc run (the first a warm-up)")
    parser.add_argument("--chat-steps", type=int, default=2, help="steps per chat run (the first a warm-up)")
    parser.add_argument("--cap-gib", type=float, default=10.0, help="a run whose RSS passes this (GiB) stops")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--out", default=str(RESULTS / "distill_scale.md"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    command = shlex.join(["python", "benchmarks/distill_scale.py", *sys.argv[1:]])
    started = time.perf_counter()
    results = []
    for spec in plan(args):
        skipped = SKIP.get((spec["shape"], spec["case"], spec["variant"]))
        result = {**spec, "error": skipped} if skipped else run_one(spec, args.timeout)
        results.append(result)
        shown = result.get("error") or f"{result['step_s']:.1f} s/step, peak {result['peak_mib']:,.0f} MiB"
        print(f"{spec['shape']} {spec['case']} {spec['variant']} L={spec['layers']}: {shown}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    out.write_text(markdown(results, command, time.perf_counter() - started))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
