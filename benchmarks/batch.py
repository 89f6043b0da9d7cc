"""``loraport batch`` at real shapes: N adapters from a Qwen2.5-1.5B-shaped base to a Gemma-2-2B-shaped one.

Uses ``perf.py``'s synthetic bases and rank-16 adapters (imported, same generator), then
measures, each in its own process (wall time; peak RSS of that process and every process
under it, sampled every 0.2 s), round-robin over ``--runs`` repetitions (medians reported):

  batch   ``loraport batch MANIFEST`` on the local process pool (default sizing);
  ray     ``loraport batch MANIFEST --ray`` (a local Ray instance started by the command,
          its start-up included);
  cli     N separate ``loraport transfer`` calls, one after the other, sharing the default
          subspace cache (empty at the start, as for a user's first batch): 1 cold + N-1 warm;
  floor   one Python process calling ``transfer()`` N times with one cache: 1 cold + N-1 warm,
          with 1 and with 2 torch threads (the faster is "the floor": on a loaded machine
          two threads can be slower than one).

Every measurement starts from an empty subspace cache. Outputs of ``batch``, ``ray`` and the
1-thread floor are compared bitwise (the batch runs one thread per job); the 2-thread floor's
numerically, as dense updates (its float32 rounding differs).

Usage::

    python benchmarks/batch.py                                         # full size (~8.5 GB of bases)
    python benchmarks/batch.py --work /tmp/batch-smoke --shrink 8 --adapters 4 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from perf import GEMMA, QWEN, write_adapter, write_base
from safetensors.torch import load_file

from loraport.batching.pools import TreeRss
from loraport.lowrank import frobenius_norm

FLOOR_SCRIPT = r"""
import json, sys, time
import torch
from loraport import transfer
cache, source, target, out_root, k, method, threads = sys.argv[1:8]
torch.set_num_threads(int(threads))
times = []
for i, adapter in enumerate(sys.argv[8:]):
    start = time.perf_counter()
    transfer(adapter, source, target, f"{out_root}/{i + 1:02d}", method=method, subspace_rank=int(k),
             cache_dir=cache, overwrite=True, progress=False)
    times.append(time.perf_counter() - start)
print(json.dumps({"times": times, "threads": torch.get_num_threads()}))
"""


# On a shared, oversubscribed machine OpenMP threads that spin-wait for a busy core make two
# threads many times slower than one; passive waiting removes that artefact for every row.
MEASURED_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def measure(argv: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a command; wall seconds, peak RSS (MB) of it and its descendants, stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **MEASURED_ENV, **(env or {})},
    )
    with TreeRss(root=proc.pid) as rss:
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:5])}... failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall": wall, "rss": rss.peak_mb, "out": out, "rc": proc.returncode}


def warm_page_cache(paths: list[Path]) -> None:
    for root in paths:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            with open(file, "rb") as handle:
                while handle.read(64 * 2**20):
                    pass


def tensors_equal(a: Path, b: Path) -> bool:
    return (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()


def max_relative_difference(a: Path, b: Path) -> float:
    """max over modules of ||B_a A_a - B_b A_b||_F / ||B_a A_a||_F, in factored form (factors are unique
    only up to rotation; ``B_a A_a - B_b A_b = [B_a, -B_b] [A_a; A_b]``)."""
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    worst = 0.0
    for key in (k for k in ta if ".lora_A." in k):
        up = key.replace("lora_A", "lora_B")
        Ba, Aa, Bb, Ab = (t[name].double() for t, name in ((ta, up), (ta, key), (tb, up), (tb, key)))
        difference = frobenius_norm(torch.cat([Ba, -Bb], dim=1), torch.cat([Aa, Ab], dim=0))
        worst = max(worst, difference / frobenius_norm(Ba, Aa))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/batch"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batch.md"))
    parser.add_argument("--shrink", type=int, default=1, help="divide every width by this (smoke tests)")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--method", default="prolora")
    parser.add_argument("--generate-only", action="store_true", help="write the bases and adapters, measure nothing")
    parser.add_argument("--skip", nargs="*", default=[], choices=["batch", "ray", "cli", "floor1", "floor2"])
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    source_shape, target_shape = QWEN.shrunk(args.shrink), GEMMA.shrunk(args.shrink)
    started = time.perf_counter()

    print("generating bases and adapters (once) ...", flush=True)
    t0 = time.perf_counter()
    source, target = work / "source", work / "target"
    write_base(source, source_shape, seed=1)
    write_base(target, target_shape, seed=2)
    adapters = []
    for i in range(1, args.adapters + 1):
        adapters.append(work / f"adapter{i:02d}")
        write_adapter(adapters[-1], source, source_shape, source_shape.layers, seed=100 + i)
    generation = time.perf_counter() - t0
    if args.generate_only:
        print(f"generated in {generation:.0f} s under {work}")
        return
    warm_page_cache([source, target, *adapters])

    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    defaults = {"source_base": str(source), "target_base": str(target), "method": args.method, "subspace_rank": args.k}

    def manifest(tag: str) -> Path:
        path = scratch / f"{tag}.yaml"
        jobs = [{"adapter": str(a), "out": str(scratch / f"out-{tag}" / f"{i:02d}")} for i, a in enumerate(adapters, 1)]
        path.write_text(json.dumps({"defaults": defaults, "jobs": jobs}, indent=1))
        return path

    def fresh(tag: str) -> tuple[Path, Path]:
        cache, out = scratch / f"cache-{tag}", scratch / f"out-{tag}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        return cache, out

    def run_batch(tag: str, *extra: str) -> dict:
        cache, _ = fresh(tag)
        path = manifest(tag)
        summary = scratch / f"{tag}.summary.json"
        cli = [sys.executable, "-m", "loraport.cli", "batch", str(path), "--cache-dir", str(cache), "--quiet"]
        result = measure([*cli, "--summary", str(summary), *extra])
        data = json.loads(summary.read_text())
        assert result["rc"] == 0 and data["succeeded"] == len(adapters), result["out"]
        return {
            "wall": result["wall"],
            "rss": result["rss"],
            "subspace_seconds": data["subspaces"]["seconds"],
            "computed": data["subspaces"]["computed"],
            "job_seconds": [j["seconds"] for j in data["jobs"]],
            "largest_job_mb": data["peak_rss_mb"]["largest_job"],
            "job_memory_estimate_mb": data["executor"]["job_memory_mb"],
            "description": data["executor"]["description"],
            "cache_misses": sum(j["cache_misses"] for j in data["jobs"]),
        }

    def run_cli() -> dict:
        cache, out = fresh("cli")
        walls, rsss = [], []
        for i, adapter in enumerate(adapters, 1):
            argv = [sys.executable, "-m", "loraport.cli", "transfer", "--adapter", str(adapter)]
            argv += ["--source-base", str(source), "--target-base", str(target), "--out", str(out / f"{i:02d}")]
            argv += ["--method", args.method, "--subspace-rank", str(args.k), "--quiet"]
            result = measure(argv, env={"LORAPORT_CACHE": str(cache)})
            walls.append(result["wall"])
            rsss.append(result["rss"])
        return {"wall": sum(walls), "walls": walls, "rss": max(rsss)}

    def run_floor(threads: int) -> dict:
        cache, out = fresh(f"floor{threads}")
        argv = [sys.executable, "-c", FLOOR_SCRIPT, str(cache), str(source), str(target), str(out), str(args.k)]
        result = measure([*argv, args.method, str(threads), *map(str, adapters)])
        data = json.loads(result["out"])
        return {"wall": result["wall"], "rss": result["rss"], "times": data["times"], "threads": data["threads"]}

    measurements = {
        "batch": lambda: run_batch("batch"),
        "ray": lambda: run_batch("ray", "--ray"),
        "cli": run_cli,
        "floor1": lambda: run_floor(1),
        "floor2": lambda: run_floor(2),
    }
    results: dict[str, list[dict]] = {name: [] for name in measurements if name not in args.skip}
    loads = [os.getloadavg()[0]]
    for run in range(args.runs):
        for name in results:
            print(f"run {run + 1}/{args.runs}: {name} ...", flush=True)
            results[name].append(measurements[name]())
            print(f"  {results[name][-1]['wall']:.1f} s, peak RSS {results[name][-1]['rss']:.0f} MB", flush=True)
            loads.append(os.getloadavg()[0])

    checks = {}
    names = [f"{i:02d}" for i in range(1, len(adapters) + 1)]
    if "batch" in results and "ray" in results:
        checks["ray_equals_batch"] = all(
            tensors_equal(scratch / "out-batch" / n, scratch / "out-ray" / n) for n in names
        )
    if "batch" in results and "floor1" in results:
        checks["floor1_equals_batch"] = all(
            tensors_equal(scratch / "out-batch" / n, scratch / "out-floor1" / n) for n in names
        )
    if "batch" in results and "floor2" in results:
        checks["batch_vs_floor2_max_rel_diff"] = max(
            max_relative_difference(scratch / "out-floor2" / n, scratch / "out-batch" / n) for n in names
        )
    summary = {
        name: {
            "wall": statistics.median(r["wall"] for r in runs),
            "walls": [r["wall"] for r in runs],
            "rss": max(r["rss"] for r in runs),
            "last": runs[-1],
        }
        for name, runs in results.items()
    }
    total = time.perf_counter() - started
    report = {
        "generation_seconds": generation,
        "results": summary,
        "checks": checks,
        "loads": loads,
        "total_seconds": total,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(args, report, source_shape.name, target_shape.name, len(adapters))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {args.out}")


def write_markdown(args: argparse.Namespace, report: dict, source: str, target: str, n: int) -> None:
    r = report["results"]
    floors = [name for name in ("floor1", "floor2") if name in r]
    best = min(floors, key=lambda name: r[name]["wall"]) if floors else None
    floor = r[best]["wall"] if best else None
    cmd = "python benchmarks/batch.py " + " ".join(sys.argv[1:])
    lines = [
        f"# `loraport batch`: {n} adapters, {source} -> {target}",
        "",
        f"Command: `{cmd}` (one run of the script; every figure below comes from it). Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (1-minute load average "
        f"{min(report['loads']):.1f}-{max(report['loads']):.1f} during the run), torch {torch.__version__}, no GPU. "
        f"Rank-16 adapters on all seven projections (perf.py's generator), method `{args.method}`, k = {args.k}, "
        f"randomized SVD. Each figure: median of {args.runs} run(s), round-robin; every run starts from an empty "
        "subspace cache. Peak RSS: the whole process tree (driver, pool workers, Ray's processes), sampled every "
        "0.2 s, summed (pages shared between processes counted once per process). The floor is the faster of the "
        f"two floor rows ({best}). Every measured process runs with `OMP_WAIT_POLICY=PASSIVE` (on this "
        "oversubscribed machine, spin-waiting OpenMP threads made 2-thread runs several times slower than 1-thread "
        "runs).",
        "",
        "| measurement | wall (s) | x floor | peak RSS (MB) | runs (s) |",
        "|---|---:|---:|---:|---|",
    ]
    labels = {
        "floor1": f"floor: one process, transfer() x {n} (1 cold + {n - 1} warm), 1 thread",
        "floor2": f"floor: one process, transfer() x {n} (1 cold + {n - 1} warm), 2 threads",
        "batch": "`loraport batch` (local pool)",
        "ray": "`loraport batch --ray` (local Ray instance, start-up included)",
        "cli": f"{n} separate `loraport transfer` calls, shared default cache",
    }
    for name in ("floor1", "floor2", "batch", "ray", "cli"):
        if name not in r:
            continue
        x = r[name]
        ratio = f"{x['wall'] / floor:.2f}" if floor else "-"
        runs = ", ".join(f"{w:.1f}" for w in x["walls"])
        lines.append(f"| {labels[name]} | {x['wall']:.1f} | {ratio} | {x['rss']:.0f} | {runs} |")
    lines.append("")
    for name in floors:
        times = r[name]["last"]["times"]
        lines.append(
            f"- {name}: cold port {times[0]:.1f} s, warm ports median {statistics.median(times[1:]):.1f} s "
            f"(last run); porting every adapter cold would cost about {n} x {times[0]:.1f} = {n * times[0]:.0f} s "
            "(estimated from its cold port, not measured)."
        )
    for name in ("batch", "ray"):
        if name in r:
            last = r[name]["last"]
            lines.append(
                f"- {name}: {last['description']}; subspace phase {last['subspace_seconds']:.1f} s "
                f"({last['computed']} subspaces computed once), ports median "
                f"{statistics.median(last['job_seconds']):.1f} s each, {last['cache_misses']} cache misses in the "
                f"ports; per-job memory estimate {last['job_memory_estimate_mb']:.0f} MB, largest job measured "
                f"{last['largest_job_mb']:.0f} MB (last run)."
            )
    if "cli" in r:
        walls = r["cli"]["last"]["walls"]
        lines.append(
            f"- cli: first (cold) call {walls[0]:.1f} s, warm calls median {statistics.median(walls[1:]):.1f} s "
            "(each includes interpreter start-up and imports)."
        )
    checks = report["checks"]
    if "ray_equals_batch" in checks:
        lines.append(
            f"- Ray outputs bitwise equal to the local pool's: **{checks['ray_equals_batch']}** ({n} adapters)."
        )
    if "floor1_equals_batch" in checks:
        lines.append(
            f"- local pool outputs bitwise equal to the 1-thread floor's (plain transfer() calls): "
            f"**{checks['floor1_equals_batch']}**."
        )
    if "batch_vs_floor2_max_rel_diff" in checks:
        lines.append(
            f"- 2-thread floor vs batch: max relative difference of the dense updates "
            f"{checks['batch_vs_floor2_max_rel_diff']:.1e} (float32 rounding of two thread counts)."
        )
    lines += [
        "",
        f"Generating the bases took {report['generation_seconds']:.0f} s (not counted); "
        f"the whole benchmark {report['total_seconds'] / 60:.1f} min.",
        "",
    ]
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
