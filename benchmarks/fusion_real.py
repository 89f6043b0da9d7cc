"""Real-model fusion benchmark (issue 21): SmolLM2 LoRAs, SmolLM2 derivatives, image LoRAs; against PEFT.

    python benchmarks/fusion_real.py --real benchmarks/work/real          # every part, cached
    python benchmarks/fusion_real.py --real benchmarks/work/real --parts lora --merges facts+bins
    python benchmarks/fusion_real.py --report-only                        # rewrite the Markdown

Inputs are built stage by stage under ``--work`` (:mod:`loraport.pretrained.fusion_build`):
SmolLM2-135M-Instruct and the ``facts`` / ``bins`` LoRAs come from the real benchmark's work
directory (``--real``, built by ``benchmarks/real_assets.py``); the ``smallest`` and ``json``
LoRAs and the two derivatives (SmolLM2 continued on Python sources / on /usr/share/doc prose)
are trained here. Parts:

* ``lora`` (:mod:`fusion_real_lora`): the four LoRAs merged two at a time and all at once by
  every adapter method of ``loraport fuse`` and by PEFT's ``add_weighted_adapter`` combination
  types; scaling chosen on the dev splits; gain kept per task on a fixed evaluation subset.
* ``models`` (:mod:`fusion_real_models`): the two derivatives fused by every model method,
  judged by held-out loss on each domain.
* ``image`` (:mod:`fusion_real_image`): two concept LoRAs of the diffusion benchmark's tiny
  text-to-image world (a kohya and a diffusers file), fused by ``loraport.fuse``.

Every score is cached under ``--work``; a rerun computes only what is missing. Writes
``benchmarks/results/fusion_real.md`` (and ``.json``) with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("lora", "models", "image")
SCRIPT = "benchmarks/fusion_real.py"
# The path options, with the default a command in the results names where the path is outside the repository.
PATH_DEFAULTS = {
    "--real": "benchmarks/work/real",
    "--work": "benchmarks/work/fusion_real",
    "--results": "benchmarks/results/fusion_real.md",
}


def repo_path(path: str, default: str, root: Path = ROOT) -> str:
    """``path`` relative to the repository ``root`` (a relative one is taken from the working directory), or
    ``default`` where it lies outside: a result file's commands must run from a fresh clone."""
    absolute = Path(os.path.abspath(path))
    for candidate in (absolute, absolute.resolve()):  # as given, then through symlinks (a linked checkout)
        if candidate.is_relative_to(root):
            return candidate.relative_to(root).as_posix() or "."
    return default


def command_line(argv: Sequence[str], root: Path = ROOT) -> str:
    """``python benchmarks/fusion_real.py ARGV`` quoted for a shell, each path option (:data:`PATH_DEFAULTS`,
    ``--opt PATH`` or ``--opt=PATH``) as :func:`repo_path` writes it."""
    args = list(argv)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in PATH_DEFAULTS:
            continue
        if eq:
            args[i] = f"{flag}={repo_path(value, PATH_DEFAULTS[flag], root)}"
        elif i + 1 < len(args):
            args[i + 1] = repo_path(args[i + 1], PATH_DEFAULTS[flag], root)
    return shlex.join(["python", SCRIPT, *args])


def clone_command(command: str, root: Path = ROOT) -> str:
    """A command recorded by an earlier run (older caches hold absolute paths) as :func:`command_line` writes it."""
    words = shlex.split(command)
    if words[:2] != ["python", SCRIPT]:
        return command
    return command_line(words[2:], root)


def lora_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from fusion_real_lora import DistillInputs, PeftMerger, Scorer, pairs_and_all, run_merges

    from loraport.adapters import load_adapter
    from loraport.evaluate import load_arc_jsonl
    from loraport.pretrained.fusion_build import SOURCE, TASKS

    real = Path(args.real)
    loras = {t: real / "loras" / f"{SOURCE}-{t}" for t in ("facts", "bins")}
    loras |= {t: work / "loras" / f"{SOURCE}-{t}" for t in ("smallest", "json")}
    merges = pairs_and_all(TASKS)
    merges = {k: v for k, v in merges.items() if k in (args.merges or []) or (not args.merges and len(v) != 3)}
    needed = sorted({t for tasks in merges.values() for t in tasks})
    n = {"dev": args.dev_n, "eval": args.eval_n}
    records = {
        (t, split): load_arc_jsonl(work / "tasks" / t / f"{split}.jsonl")[: n[split]]
        for t in needed
        for split in ("dev", "eval")
    }
    model_dir = real / "models" / SOURCE
    scorer = Scorer(model_dir, records, work / f"lora_scores-{args.dev_n}-{args.eval_n}.json")
    adapters = {t: load_adapter(loras[t]) for t in needed}
    peft = PeftMerger(model_dir, {t: loras[t] for t in needed})
    calib = {t: work / "calibration" / f"{t}.txt" for t in needed}
    rows_path = work / f"lora_rows-{args.dev_n}-{args.eval_n}.json"
    distill = DistillInputs(
        loras={t: loras[t] for t in needed},
        prompts={t: work / "tasks" / t / "train.jsonl" for t in needed},
        out=work / "distilled",
        seconds=args.distill_time,
    )
    result = run_merges(scorer, adapters, peft, merges, model_dir, calib, rows_path, args.methods, distill)
    result["relative_update"] = {t: relative_update(adapters[t], model_dir) for t in needed}
    result["subsets"] = {f"{t}|{split}": len(r) for (t, split), r in records.items()}
    result["sizes"] = {"dev": args.dev_n, "eval": args.eval_n}
    return result


def relative_update(adapter: Any, model_dir: Path) -> float:
    """``||dW|| / ||W||`` over the adapted projections (all of them together)."""
    from loraport.checkpoints import Checkpoint

    ckpt = Checkpoint.open(model_dir)
    num = den = 0.0
    for name, module in adapter.modules.items():
        num += float(module.delta().pow(2).sum())
        den += float(ckpt.get(name + ".weight").float().pow(2).sum())
    return (num / den) ** 0.5


def collect_results(work: Path, committed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every cached part: ``results-<part>.json``; the LoRA runs as one part per subset size.

    ``committed`` (the results file as committed) fills in what this work directory lacks: a
    part, a row, a reference accuracy, a command (a fresh clone reruns only new rows).

    A LoRA part holds every merge in that size's row cache (``lora_rows-<dev>-<eval>.json``,
    whichever run scored it) with the base and LoRA accuracies from its score cache; the
    commands and relative update sizes come from the runs' results files. The models part
    holds every row of ``models_rows.json`` (a run stopped part way keeps its rows).
    """
    from fusion_real_lora import reference_accuracies
    from fusion_real_models import models_summary

    files = {p.stem.removeprefix("results-"): json.loads(p.read_text()) for p in sorted(work.glob("results-*.json"))}
    results = {name: part for name, part in files.items() if not name.startswith("lora-")}
    for part in results.values():
        if "commands" in part:
            part["commands"] = list(dict.fromkeys(clone_command(c) for c in part["commands"]))
    for rows_path in sorted(work.glob("lora_rows-*.json")):
        size = rows_path.stem.removeprefix("lora_rows-")
        runs = [part for name, part in files.items() if name.startswith(f"lora-{size}-")]
        rows = json.loads(rows_path.read_text())
        scores = json.loads((work / f"lora_scores-{size}.json").read_text())
        dev, evaluation = (int(n) for n in size.split("-"))
        results[f"lora-{size}"] = {
            "rows": rows,
            "references": reference_accuracies(scores, sorted({t for row in rows.values() for t in row["eval"]})),
            "relative_update": {t: v for run in runs for t, v in run.get("relative_update", {}).items()},
            "sizes": {"dev": dev, "eval": evaluation},
            "commands": list(dict.fromkeys(clone_command(c) for run in runs for c in run["commands"])),
        }
    if (work / "models_rows.json").exists():
        rows = json.loads((work / "models_rows.json").read_text())
        results["models"] = {**files.get("models", {}), **models_summary(work, rows)}
    results["assets"] = {p.stem: json.loads(p.read_text()) for p in sorted((work / "stages").glob("*.json"))}
    return with_committed(results, committed or {})


def earlier_build(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old``'s rows, each that fused a LoRA whose own accuracy differs in ``new``'s references (the LoRA was
    rebuilt since) marked with ``earlier_build``: which LoRAs, and their accuracy then and now."""
    changed = {
        key.split("|")[0]: (ref["specialist"], new["references"][key]["specialist"])
        for key, ref in old.get("references", {}).items()
        if key.endswith("|eval") and key in new.get("references", {})
        and abs(ref["specialist"] - new["references"][key]["specialist"]) > 1e-9
    }  # fmt: skip
    rows = {}
    for key, row in old.get("rows", {}).items():
        hit = {t: v for t, v in changed.items() if t in row["eval"]}
        rows[key] = {**row, "earlier_build": hit} if hit else row
    return rows


def with_committed(results: dict[str, Any], committed: dict[str, Any]) -> dict[str, Any]:
    """``results`` over ``committed``: parts, and within LoRA parts rows, references and commands, merged."""
    merged = {**committed, **results}
    for name, part in results.items():
        old = committed.get(name)
        if (not name.startswith("lora-") and name != "assets") or not isinstance(old, dict):
            continue
        if name == "assets":
            merged[name] = {**old, **part}
            continue
        merged[name] = {
            **part,
            "rows": {**earlier_build(old, part), **part["rows"]},
            "references": {**old.get("references", {}), **part["references"]},
            "relative_update": {**old.get("relative_update", {}), **part["relative_update"]},
            "commands": list(dict.fromkeys([*old.get("commands", []), *part["commands"]])),
        }
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default="benchmarks/work/real", help="the real benchmark's work directory")
    parser.add_argument("--work", default="benchmarks/work/fusion_real", help="inputs and cached scores")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument(
        "--merges", nargs="*", default=None, help="LoRA merges to run (default: every pair and all four)"
    )
    parser.add_argument("--methods", nargs="*", default=None, help="rows to run (default: all)")
    parser.add_argument("--dev-n", type=int, default=16, help="dev questions per task (default 16)")
    parser.add_argument("--eval-n", type=int, default=80, help="evaluation questions per task (default 80)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--distill-time", type=float, default=None, help="the distill row: the student's training-time limit (s)"
    )
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "fusion_real.md"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the cached results")
    parser.add_argument("--no-build", action="store_true", help="use the inputs built so far (another runner builds)")
    args = parser.parse_args(argv)

    import torch

    from loraport.io import atomic_write_text
    from loraport.pretrained.fusion_build import FusionRealConfig, build_fusion_assets

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if not args.report_only:
        started = time.perf_counter()
        config = FusionRealConfig(real=args.real, threads=args.threads)
        if not args.no_build:
            build_fusion_assets(work, config)
        command = command_line(sys.argv[1:] if argv is None else argv)
        for part in args.parts:
            # one results file per part (and LoRA subset sizes): parts may run in parallel processes
            slug = "_".join(sorted(m.replace("+", "-").replace(" ", "-") for m in args.merges or ["every-merge"]))
            name = f"results-lora-{args.dev_n}-{args.eval_n}-{slug}.json" if part == "lora" else f"results-{part}.json"
            path = work / name
            done: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
            t0 = time.perf_counter()
            if part == "lora":
                data = lora_part(args, work)
            elif part == "models":
                from fusion_real_models import run_models

                data = run_models(Path(args.real), work)
            else:
                from fusion_real_image import run_image

                data = run_image(work / "image")
            commands = [c for c in map(clone_command, done.get("commands", [])) if c != command] + [command]
            data.update(commands=commands, seconds=time.perf_counter() - t0)
            atomic_write_text(path, json.dumps(data, indent=1))
        print(f"ran {', '.join(args.parts)} in {time.perf_counter() - started:.0f} s")
    committed = Path(args.results).with_suffix(".json")
    results = collect_results(work, json.loads(committed.read_text()) if committed.exists() else None)
    from fusion_real_report import markdown

    atomic_write_text(args.results, markdown(results))
    atomic_write_text(Path(args.results).with_suffix(".json"), json.dumps(results, indent=1))
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
