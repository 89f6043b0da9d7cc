"""Fingerprints of what loraport writes, to show that a refactor changed no output byte.

``python scripts/output_fingerprints.py --work /tmp/fp --out before.json`` builds tiny models
(the tests' own builders, fixed seeds), runs a fixed set of ports (LLM: every closed-form
method, calibrated shared and mapped; image LoRAs: kohya and diffusers out), fuses (models
and adapters) and a batch, and writes the SHA-256 of every output file. JSON files are
hashed after removing the fields that change from run to run (times, peak memory, the input
files' mtimes in batch records); Markdown reports (renderings of the JSON ones) are left out.
Run it before and after a change with the same ``--work`` and compare the two files
(``--compare before.json``): the script exits 1 and lists every difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOLATILE = {"seconds", "peak_rss_mb", "wall_seconds", "time_seconds", "started", "finished", "elapsed", "rss_mb"}


def _scrub(value: Any) -> Any:
    """``value`` without times, peak memory and input fingerprints (they stamp each input file's mtime)."""
    if isinstance(value, dict):
        return {
            k: _scrub(v)
            for k, v in value.items()
            if k not in VOLATILE and not k.endswith("_seconds") and not (k == "inputs" and "loraport_job" in value)
        }
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"\b\d+(\.\d+)? s\b", "<time> s", value)
    return value


def digest(path: Path) -> str:
    """SHA-256 of a file; JSON without volatile fields; safetensors by metadata (sorted) and tensor bytes,
    because the safetensors writer orders the metadata map differently in every process."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        hasher = hashlib.sha256()
        with safe_open(str(path), "pt") as handle:
            hasher.update(json.dumps(handle.metadata() or {}, sort_keys=True).encode())
            for name in sorted(handle.keys()):
                tensor = handle.get_tensor(name).contiguous()
                hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
                hasher.update(tensor.view(-1).view(torch_uint8()).numpy().tobytes())
        return hasher.hexdigest()
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(_scrub(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def torch_uint8():  # type: ignore[no-untyped-def]
    import torch

    return torch.uint8


def fingerprints(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): digest(p)
        for p in sorted(root.rglob("*"))
        # Markdown reports are renderings of the JSON reports, with the times left in.
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"
    }


def build_inputs(work: Path) -> dict[str, Path]:
    from loraport.zoo import demo_dir
    from loraport.zoo.tiny import make_random_adapter, make_tiny_model, perturb_model
    from loraport.zoo.tiny_diffusion import make_random_kohya_lora, make_tiny_sd, perturb_sd

    inputs = work / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    paths = {
        "llama": make_tiny_model("llama", inputs / "llama", seed=0, layers=3),
        "gemma2": make_tiny_model(
            "gemma2", inputs / "gemma2", seed=1, hidden=96, layers=3, heads=4, kv_heads=1, intermediate=160, head_dim=24
        ),
        "sd1": make_tiny_sd(inputs / "sd1", "sd1", seed=0),
    }
    paths["llama_d"] = perturb_model(paths["llama"], inputs / "llama-d", 0.1, 1)
    paths["lora"] = make_random_adapter(paths["llama"], inputs / "lora", r=8, seed=0)
    paths["lora2"] = make_random_adapter(paths["llama"], inputs / "lora2", r=8, seed=1)
    paths["sd1_d"] = perturb_sd(paths["sd1"], inputs / "sd1-d", 0.1)
    paths["kohya"] = make_random_kohya_lora(paths["sd1"], inputs / "kohya.safetensors", rank=4, conv=True)
    zoo = demo_dir()
    for name in ("S", "D15", "X"):
        paths[f"zoo_{name}"] = zoo / "models" / name
    paths["zoo_lora"] = zoo / "loras" / "S-facts"
    paths["zoo_text"] = zoo / "calibration.txt"
    return paths


def run_all(work: Path) -> None:
    import torch

    from loraport import batch, transfer
    from loraport.fusion import fuse, fuse_adapters

    torch.set_num_threads(1)
    p = build_inputs(work)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    quiet = {"progress": False, "use_cache": False}
    for method in ("identity", "project", "lorax", "procrustes", "prolora", "auto"):
        transfer(p["lora"], p["llama"], p["llama_d"], out / f"llama-{method}", method=method, **quiet)
    transfer(p["lora"], p["llama"], p["gemma2"], out / "gemma2-prolora", method="prolora", threshold=0.1,
             fallback="project", report_path=out / "gemma2-prolora.json", **quiet)  # fmt: skip
    calib = {"calibration": str(p["zoo_text"]), "calib_samples": 48, "calib_max_tokens": 32}
    transfer(p["zoo_lora"], p["zoo_S"], p["zoo_D15"], out / "zoo-D15-calibrated", method="calibrated", **calib, **quiet)
    transfer(p["zoo_lora"], p["zoo_S"], p["zoo_X"], out / "zoo-X-mapped", method="calibrated", calib_mode="mapped",
             **calib, **quiet)  # fmt: skip
    transfer(p["kohya"], p["sd1"], p["sd1_d"], out / "sd-kohya.safetensors", method="prolora", subspace_rank=8, **quiet)
    transfer(p["kohya"], p["sd1"], p["sd1_d"], out / "sd-diffusers", method="identity", out_format="diffusers", **quiet)
    fuse(p["llama"], p["llama_d"], out / "fuse-average", method="average", progress=False)
    fuse(p["llama"], p["llama_d"], out / "fuse-ties", method="ties", base=p["llama"], progress=False)
    fuse(p["llama"], p["llama_d"], out / "fuse-rgsp", method="rgsp", progress=False)
    fuse_adapters(p["lora"], p["lora2"], out / "fuse-lora-iso_cts", method="iso_cts", rank=8, progress=False)
    fuse_adapters(p["lora"], p["lora2"], out / "fuse-lora-tsv", method="tsv", progress=False)
    manifest = {
        "defaults": {"source_base": str(p["llama"]), "target_base": str(p["llama_d"]), "method": "prolora"},
        "jobs": [
            {"adapter": str(p["lora"]), "out": str(out / "batch" / "one")},
            {"adapter": str(p["lora2"]), "out": str(out / "batch" / "two"), "subspace_rank": 16},
        ],
    }
    result = batch(manifest, workers=1, cache_dir=work / "batch-cache", progress=False)
    assert result.ok, result.table()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/loraport-fingerprints", help="work directory (recreated)")
    parser.add_argument("--out", required=True, help="JSON file of fingerprints to write")
    parser.add_argument("--compare", default=None, help="fingerprints of an earlier run to compare with")
    args = parser.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work / "batch-cache", ignore_errors=True)
    run_all(work)
    prints = fingerprints(work / "out")
    Path(args.out).write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
    print(f"{len(prints)} output file(s) fingerprinted -> {args.out}")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        diffs = sorted(k for k in before.keys() | prints.keys() if before.get(k) != prints.get(k))
        for key in diffs:
            print(f"DIFFERENT: {key} ({before.get(key, 'absent')[:12]} -> {prints.get(key, 'absent')[:12]})")
        print("identical" if not diffs else f"{len(diffs)} difference(s)")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
