"""Time and peak memory of calibrated transfer on real-shape layers (Qwen2.5-1.5B-shaped, bf16).

    python benchmarks/perf.py --generate-only            # once: the synthetic bases and adapters
    python benchmarks/calibrated_scale.py                # writes benchmarks/results/calibrated_scale.md

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
adapter, source, target, out, text, samples, tokens, beta = sys.argv[1:9]
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
                  progress=False)
seconds = time.perf_counter() - started
stop.append(1)
hwm = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
records = result.report.records
print(json.dumps({"seconds": seconds, "cpu_seconds": ru.ru_utime + ru.ru_stime, "peak_rss_mb": hwm,
                  "tokens": result.report.calibration["tokens"], "units": len(records),
                  "fit_copy": sum(r.fit_copy for r in records) / len(records),
                  "fit_after": sum(r.fit_after for r in records) / len(records)}))
"""


def make_view(full: Path, out: Path, layers: int, tokenizer: Path) -> Path:
    """The first ``layers`` layers of a sharded base (symlinked shards), as a Llama config, with a tokenizer."""
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
    config.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_hidden_layers=layers,
        tie_word_embeddings=False,
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
        "--runs", nargs="+", default=["2:1", "7:1", "2:0"], help="LAYERS:BETA pairs (BETA = --calib-output-weight)"
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    perf, zoo, work = Path(args.perf), Path(args.zoo), Path(args.work)
    source, derivative, adapter = perf / "source", perf / "source-derivative", perf / "adapter1-x1"
    for path in (source, derivative, adapter):
        if not path.exists():
            raise SystemExit(f"{path} missing: run python benchmarks/perf.py --generate-only first")
    work.mkdir(parents=True, exist_ok=True)
    text = make_text(zoo / "calibration.txt", work / "calibration.txt", args.samples)
    rows = []
    for run in args.runs:
        layers, beta = int(run.split(":")[0]), float(run.split(":")[1])
        s = make_view(source, work / f"S-{layers}", layers, zoo / "tokenizer")
        t = make_view(derivative, work / f"D-{layers}", layers, zoo / "tokenizer")
        a = make_adapter(adapter, work / f"lora-{layers}", layers)
        argv_child = [sys.executable, "-c", CHILD, str(a), str(s), str(t), str(work / f"out-{layers}-{beta}"),
                      str(text), str(args.samples), str(args.tokens), str(beta)]  # fmt: skip
        load = os.getloadavg()[0]
        done = subprocess.run(argv_child, capture_output=True, text=True, check=True)
        row = {"layers": layers, "beta": beta, "load_start": load, "load_end": os.getloadavg()[0],
               **json.loads(done.stdout.strip().splitlines()[-1])}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = "python " + " ".join(shlex.quote(x) for x in ["benchmarks/calibrated_scale.py", *(argv or sys.argv[1:])])
    lines = [
        "# Calibrated transfer at real layer shapes (Qwen2.5-1.5B-shaped, bf16, CPU)",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} shared cores, one torch thread "
        "per port. Source: the first L layers of `perf.py`'s synthetic Qwen2.5-1.5B-shaped base; target: the same "
        "layers of its 15 %-drift derivative; rank-16 LoRA on all seven projections. Calibration: "
        f"{args.samples} samples x {args.tokens} tokens. Fit: mean relative error ||dW X_t - Y||^2 / ||Y||^2 over "
        "modules, of a plain copy and of the calibrated port (Y: the teacher's module output minus the "
        "student's base output for beta 1; the adapter's contribution dW_s X_s for beta 0). The synthetic "
        "bases are random matrices with a pretrained-like spectrum, not trained models: the fits say the "
        "regression works at this size, not how much accuracy it recovers.",
        "",
        "| layers | beta | tokens | time (s) | CPU time (s) | s / layer | peak RSS (MB) | fit: copy | fit: calibrated "
        "| load (start, end) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['beta']:g} | {r['tokens']} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
            f"{r['seconds'] / r['layers']:.0f} | {r['peak_rss_mb']:.0f} | {r['fit_copy']:.3f} | {r['fit_after']:.3f} | "
            f"{r['load_start']:.1f}, {r['load_end']:.1f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
