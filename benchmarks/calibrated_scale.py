"""Time and peak memory of calibrated transfer on real-shape layers (Qwen2.5-1.5B-shaped, bf16).

    python benchmarks/perf.py --generate-only            # once: the synthetic bases and adapters
    python benchmarks/calibrated_scale.py                # writes benchmarks/results/calibrated_scale.md

Runs ``LAYERS:BETA`` port the source's first layers to the same layers of a target with the
same tokenizer (``shared`` mode); runs ``xLAYERS`` port them to the first layers of ``perf``'s
Gemma-2-2B-shaped base (hidden 2304, intermediate 9216, 8 / 4 heads, head_dim 256, vocabulary
256,000; Llama tensors, so served as a Llama of those shapes) with a byte-level BPE tokenizer
trained on the zoo's sentences: another tokenizer, widths and head layout, so the ``mapped``
mode (alignment, CKA depth pairing, maps, residual writers).

The source is the first ``L`` layers of ``perf``'s synthetic Qwen2.5-1.5B-shaped base
(hidden 1536, intermediate 8960, 12 / 2 heads, vocabulary 151,936), the target the same
layers of its 15 %-drift derivative, the adapter ``perf``'s rank-16 LoRA on all seven
projections (restricted to those layers). They are served as Llama configs (Qwen-2 would
want q/k/v biases the synthetic bases lack) with the zoo's word-level tokenizer, whose ids
index the large embedding. Each run is a fresh process with one torch thread, sampling its
RSS every 0.2 s; the calibration text is the zoo's sentences joined into 128-token samples.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import torch
torch.set_num_threads(1)
from loraport import transfer
adapter, source, target, out, text, samples, tokens, beta, mode = sys.argv[1:10]
trace, stop = [], []
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
def sample():
    t0 = time.perf_counter()
    while not stop:
        trace.append((time.perf_counter() - t0, rss()))
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()
result = transfer(adapter, source, target, out, overwrite=True, method="calibrated", calibration=text,
                  calib_samples=int(samples), calib_max_tokens=int(tokens), calib_output_weight=float(beta),
                  calib_mode=mode, progress=False)
seconds = time.perf_counter() - started
stop.append(1)
from loraport.report import peak_rss_mb
hwm = peak_rss_mb()
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
records = [r for r in result.report.records if r.fit_after is not None]
copies = [r.fit_copy for r in records if r.fit_copy is not None]
calibration = result.report.calibration
print(json.dumps({"seconds": seconds, "cpu_seconds": ru.ru_utime + ru.ru_stime, "peak_rss_mb": hwm,
                  "tokens": calibration["tokens"], "units": len(records), "mode": calibration.get("mode", "shared"),
                  "aligned": calibration.get("aligned_positions"), "map_r2": calibration.get("mean_map_r2"),
                  "fit_copy": sum(copies) / len(copies) if copies else None,
                  "fit_after": sum(r.fit_after for r in records) / len(records)}))
"""


FLOOR = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from loraport.calibrate import base_tokenizers
from loraport.calibrate.accumulate import add_product
from loraport.calibrate.mapped import make_paired_chunks
from loraport.calibrate.text import align_calibration, read_calibration_lines
from loraport.checkpoints import Checkpoint
from loraport.pairing import Pairing
from loraport.adapters import load_adapter
from loraport.streaming import Stream, StreamedModel
adapter, source, target, text, samples, tokens = sys.argv[1:7]
pairing = Pairing(load_adapter(adapter), Checkpoint.open(source), Checkpoint.open(target))
tok_s, tok_t = base_tokenizers(pairing.src, pairing.tgt)
lines, name = read_calibration_lines(text)
aligned, _ = align_calibration(lines, tok_s, tok_t, int(samples), int(tokens), name)
chunks = make_paired_chunks(aligned, 0, 0, 16, 2)
started = time.perf_counter()
for side, ckpt, arch in ((0, pairing.src, pairing.arch_s), (1, pairing.tgt, pairing.arch_t)):
    stream = Stream(StreamedModel(ckpt, arch, "cpu"), [c.target if side else c.source for c in chunks])
    count = pairing.layers_t if side else pairing.layers_s
    for i in range(count):
        layer = stream.model.load_layer(i)
        grams = {}
        def hook(mod, args, key=None):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            g = grams.setdefault(key, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64))
            add_product(g, x, x)
        handles = []
        if side:  # the writers' Gram products
            for role in ("attn.o", "mlp.down"):
                spec, _ = arch.locate(role)
                handles.append(layer.get_submodule(spec.suffix).register_forward_pre_hook(
                    lambda m, a, key=role: hook(m, a, key)))
        stream.advance(layer)
        for h in handles:
            h.remove()
        stream.model.release_layer(i)
print(json.dumps({"floor_seconds": time.perf_counter() - started}))
"""


def make_view(full: Path, out: Path, layers: int, tokenizer: Path, gemma: bool = False) -> Path:
    """The first ``layers`` layers of a sharded base (symlinked shards) as a Llama config, plus a tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((full / "model.safetensors.index.json").read_text())

    def kept(key: str) -> bool:
        return not (key.startswith("model.layers.") and int(key.split(".")[2]) >= layers)

    keep = {k: v for k, v in index["weight_map"].items() if kept(k)}
    for shard in set(keep.values()):
        if not (out / shard).exists():
            (out / shard).symlink_to((full / shard).resolve())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    config = json.loads((full / "config.json").read_text())
    # perf's Gemma-2-2B-shaped base has Llama's tensors (no Gemma post-norms): served as a Llama of
    # Gemma-2-2B's shapes (head_dim 256), with the output head tied to the embeddings.
    config.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_hidden_layers=layers,
        tie_word_embeddings=gemma,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_theta=1e6,
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in tokenizer.iterdir():
        shutil.copy(f, out / f.name)
    return out


def make_adapter(full: Path, out: Path, layers: int) -> Path:
    from loraport.adapters import LoraAdapter, load_adapter, save_adapter

    adapter = load_adapter(full)
    modules = {k: v for k, v in adapter.modules.items() if int(k.split(".")[2]) < layers}
    if not (out / "adapter_model.safetensors").exists():
        save_adapter(LoraAdapter(modules, adapter.config, dtype=adapter.dtype), out)
    return out


def make_bpe(zoo_text: Path, out: Path) -> Path:
    """A byte-level BPE tokenizer (2,000 tokens) trained on the zoo's sentences: the cross rows' target tokenizer."""
    from loraport.zoo.tiny import make_bpe_tokenizer

    if not (out / "tokenizer.json").exists():
        make_bpe_tokenizer(out, zoo_text.read_text().splitlines(), 2000)
    return out


def make_text(zoo_text: Path, out: Path, samples: int, words: int = 130) -> Path:
    lines = zoo_text.read_text().splitlines()
    rows, current = [], []
    for line in lines * 8:
        current.append(line)
        if sum(len(x.split()) for x in current) >= words:
            rows.append(" ".join(current))
            current = []
        if len(rows) == samples:
            break
    out.write_text("\n".join(rows) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="calibrated transfer at real layer shapes: time and peak memory")
    parser.add_argument("--perf", default="benchmarks/work/perf", help="perf.py's work directory (--generate-only)")
    parser.add_argument("--zoo", default="benchmarks/work/zoo", help="for the tokenizer and calibration sentences")
    parser.add_argument("--work", default="benchmarks/work/calibrated_scale")
    parser.add_argument("--out", default="benchmarks/results/calibrated_scale.md")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["2:1", "2:0", "x2"],
        help="LAYERS:BETA (same tokenizer, BETA = --calib-output-weight) or xLAYERS (to the Gemma-2-2B shape)",
    )
    parser.add_argument("--target", default=None, help="the Gemma-2-2B-shaped base (default: PERF/target)")
    parser.add_argument("--adapter", default=None, help="a rank-16 adapter of the source (default: PERF/adapter1-x1)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--reuse", action="store_true", help="take a run's row from WORK/rows.jsonl when it is there (else measure)"
    )
    args = parser.parse_args(argv)
    perf, zoo, work = Path(args.perf), Path(args.zoo), Path(args.work)
    source = perf / "source"
    gemma = Path(args.target) if args.target else perf / "target"
    adapter = Path(args.adapter) if args.adapter else perf / "adapter1-x1"
    for path in (source, gemma, adapter):
        if not path.exists():
            raise SystemExit(f"{path} missing: run python benchmarks/perf.py --generate-only first")
    work.mkdir(parents=True, exist_ok=True)
    text = make_text(zoo / "calibration.txt", work / "calibration.txt", args.samples)
    rows = []
    measured = work / "rows.jsonl"  # every row this script measured, newest last
    earlier = {}
    if args.reuse and measured.exists():
        earlier = {row["run"]: row for row in map(json.loads, measured.read_text().splitlines())}
    for run in args.runs:
        if run in earlier:
            rows.append(earlier[run])
            print(f"{run}: reused from {measured} (measured {earlier[run].get('date', 'earlier')})", flush=True)
            continue
        cross = run.startswith("x")
        layers, beta = (int(run[1:]), 0.0) if cross else (int(run.split(":")[0]), float(run.split(":")[1]))
        s = make_view(source, work / f"S-{layers}", layers, zoo / "tokenizer")
        if cross:
            t = make_view(gemma, work / f"G-{layers}", layers, make_bpe(zoo / "calibration.txt", work / "bpe"), True)
        else:  # the same layers as target: the cost of a same-tokenizer port at this shape
            t = s
        a = make_adapter(adapter, work / f"lora-{layers}", layers)
        mode = "mapped" if cross else "shared"
        argv_child = [sys.executable, "-c", CHILD, str(a), str(s), str(t), str(work / f"out-{run}"),
                      str(text), str(args.samples), str(args.tokens), str(beta), mode]  # fmt: skip
        load = os.getloadavg()[0]
        done = subprocess.run(argv_child, capture_output=True, text=True, check=True)
        row = {"run": run, "layers": layers, "beta": beta, "load_start": load, "load_end": os.getloadavg()[0],
               **json.loads(done.stdout.strip().splitlines()[-1])}  # fmt: skip
        floor_argv = [
            sys.executable,
            "-c",
            FLOOR,
            str(a),
            str(s),
            str(t),
            str(text),
            str(args.samples),
            str(args.tokens),
        ]
        floor = subprocess.run(floor_argv, capture_output=True, text=True, check=True)
        row.update(json.loads(floor.stdout.strip().splitlines()[-1]))
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        rows.append(row)
        with measured.open("a") as log:
            log.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    command = "python " + " ".join(shlex.quote(x) for x in ["benchmarks/calibrated_scale.py", *(argv or sys.argv[1:])])
    lines = [
        "# Calibrated transfer at real layer shapes (Qwen2.5-1.5B-shaped source, bf16, CPU)",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} shared cores, one torch thread "
        "per port. Source: the first L layers of `perf.py`'s synthetic Qwen2.5-1.5B-shaped base with the zoo's "
        "word-level tokenizer; rank-16 LoRA on all seven projections. *shared* rows: the target is the same "
        "layers (same tokenizer and shapes: the cost of a port to a fine-tune); *mapped* rows: the target is the "
        "first L layers of `perf.py`'s Gemma-2-2B-shaped base (Llama tensors of Gemma-2-2B's shapes) with a "
        "byte-level BPE tokenizer (2,000 tokens) "
        f"trained on the zoo's sentences. Calibration: {args.samples} samples x {args.tokens} tokens. Floor: one "
        "process streaming the calibration text once through each base, layer by layer, plus the Gram "
        "products of the target's residual writers' inputs (what any calibrated method must do). Fit: mean "
        "relative error of the fitted modules (shared: ||dW X_t - Y||^2 / ||Y||^2, copy next to it; mapped: of "
        "the writers against the mapped residual target). The bases are random matrices with a pretrained-like "
        "spectrum, not trained models: the fits and R^2 say the machinery works at this size, not how much "
        "accuracy it recovers.",
        "",
        "| run | mode | layers | beta | tokens | aligned | time (s) | CPU (s) | s / layer | floor (s) | time / floor | "
        "peak RSS (MB) | map R^2 | fit: copy | fit: calibrated | load (start, end) | measured |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]

    def f(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for r in rows:
        lines.append(
            f"| {r['run']} | {r['mode']} | {r['layers']} | {r['beta']:g} | {r['tokens']} | {r.get('aligned') or '-'} | "
            f"{r['seconds']:.0f} | {f(r.get('cpu_seconds'), 0)} | {r['seconds'] / r['layers']:.0f} | "
            f"{r['floor_seconds']:.0f} | {r['seconds'] / r['floor_seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{f(r.get('map_r2'), 2)} | {f(r['fit_copy'])} | {f(r['fit_after'])} | "
            f"{r['load_start']:.1f}, {r['load_end']:.1f} | {r.get('date', '-')} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
