"""The derivative part of the real fusion benchmark: two SmolLM2 full fine-tunes fused, judged by held-out loss.

Used by ``benchmarks/fusion_real.py``. C is SmolLM2-135M-Instruct; ``python`` and ``docs`` are C
continued (every weight) on Python standard-library sources and on /usr/share/doc prose
(:mod:`loraport.pretrained.fusion_build`). Each model method of :func:`loraport.fusion.fuse`
runs once at ``scaling = 1`` through the public API (written to a temporary directory); the
tensors the method merged are ``W_C + D``, so other scalings are ``W_C + s D`` (every
task-vector method is linear in its scaling), searched on the **dev** text of both domains by
the worst domain's share of the loss improvement kept. Scored on the **eval** text: per
domain, ``kept = (L_C - L_merged) / (L_C - L_own)`` where ``own`` is the derivative trained on
that domain; standard errors over the 128-token windows (delta method).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fusion_real_lora import gain_kept, say

DOMAINS = ("python", "docs")
SCALINGS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
# (row, method, settings, scaled): the model methods of `loraport fuse` (rgsp: see the note in the results).
METHODS: list[tuple[str, str, dict[str, Any], bool]] = [
    ("average", "average", {}, False),
    ("task arithmetic", "task_arithmetic", {}, True),
    ("task arithmetic, all tensors", "task_arithmetic", {"include": ".", "exclude": ""}, True),
    ("TIES d=0.2", "ties", {"density": 0.2}, True),
    ("DARE d=0.5", "dare", {"density": 0.5}, True),
    ("TSV", "tsv", {}, True),
    ("Iso-C", "iso_c", {}, True),
    ("Iso-CTS", "iso_cts", {}, True),
    ("RegMean (domain text)", "regmean", {}, False),
]
SEQ_LEN = 128


@torch.no_grad()
def window_losses(model: Any, tokens: torch.Tensor, batch_size: int = 16) -> list[float]:
    """Mean next-token loss of each consecutive ``SEQ_LEN`` window of ``tokens``."""
    n = (len(tokens) - 1) // SEQ_LEN
    windows = tokens[: n * SEQ_LEN].view(n, SEQ_LEN)
    out: list[float] = []
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out += loss.mean(1).tolist()
    return out


def _load_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def _calibration(work: Path, domain: str, pieces: int = 256, chars: int = 600) -> list[str]:
    """Unlabeled training text of one domain as ``pieces`` chunks (RegMean's inputs of that model)."""
    text = "\n".join(json.loads((work / "text" / f"{domain}-train.json").read_text()))
    step = max(chars, len(text) // pieces)
    return [text[i : i + chars].replace("\n", " ") for i in range(0, step * pieces, step)][:pieces]


def run_models(real: Path, work: Path) -> dict[str, Any]:
    from loraport.evaluate import load_model, load_tokenizer
    from loraport.fusion import fuse
    from loraport.io import atomic_write_text
    from loraport.zoo.train import pack

    rows_path = work / "models_rows.json"
    rows: dict[str, Any] = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    base_dir = real / "models" / "smollm2"
    inputs = {d: work / "models" / d for d in DOMAINS}
    tokenizer = load_tokenizer(base_dir)
    text = {
        (d, split): pack(tokenizer, json.loads((work / "text" / f"{d}-{split}.json").read_text()))
        for d in DOMAINS
        for split in ("dev", "eval")
    }
    model = load_model(base_dir)
    model.eval()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def losses(state: dict[str, torch.Tensor], split: str) -> dict[str, list[float]]:
        model.load_state_dict(state, strict=False)
        return {d: window_losses(model, text[(d, split)]) for d in DOMAINS}

    cache_path = work / "models_reference.json"
    if cache_path.exists():
        reference = json.loads(cache_path.read_text())
    else:
        reference = {"C": {s: losses(base_state, s) for s in ("dev", "eval")}}
        for d, path in inputs.items():
            state = {**base_state, **_load_state(path)}
            reference[d] = {s: losses(state, s) for s in ("dev", "eval")}
        atomic_write_text(cache_path, json.dumps(reference))

    def kept(merged: dict[str, list[float]], split: str) -> dict[str, tuple[float, float]]:
        out = {}
        for d in DOMAINS:
            neg = [[-x for x in series] for series in (merged[d], reference["C"][split][d], reference[d][split][d])]
            out[d] = gain_kept(*neg)
        return out

    for row, method, settings, scaled in METHODS:
        if row in rows:
            continue
        say(f"derivatives: {row} ...")
        extra = dict(settings)
        if method == "regmean":
            extra["model_calibration"] = [_calibration(work, d) for d in DOMAINS]
        tmp = Path(tempfile.mkdtemp(prefix="fusion-real-", dir=work))
        try:
            started = time.perf_counter()
            result = fuse(
                inputs["python"], inputs["docs"], tmp / "out", base=base_dir, method=method, progress=False, **extra
            )
            seconds = time.perf_counter() - started
            fused = _load_state(tmp / "out")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        merged_names = {r.name for r in result.report.records if r.action == method}

        def state_at(
            s: float, fused: dict[str, torch.Tensor] = fused, merged_names: set[str] = merged_names
        ) -> dict[str, torch.Tensor]:
            if s == 1.0:
                return fused
            return {
                k: (base_state[k] + s * (v.float() - base_state[k]) if k in merged_names else v)
                for k, v in fused.items()
            }

        tried = []
        for s in SCALINGS if scaled else (1.0,):
            dev = kept(losses(state_at(s), "dev"), "dev")
            worst, mean = min(v[0] for v in dev.values()), sum(v[0] for v in dev.values()) / len(dev)
            tried.append((s, worst, mean))
        scaling = max(tried, key=lambda item: (item[1], item[2]))[0]
        evaluated = losses(state_at(scaling), "eval")
        values = kept(evaluated, "eval")
        rows[row] = {
            "method": method,
            "settings": {k: v for k, v in settings.items()},
            "scaling": scaling,
            "dev_tried": tried,
            "eval_loss": {d: sum(v) / len(v) for d, v in evaluated.items()},
            "kept": {d: {"value": v, "se": se} for d, (v, se) in values.items()},
            "fuse_seconds": seconds,
            "merged_tensors": len(merged_names),
        }
        atomic_write_text(rows_path, json.dumps(rows, indent=1))
        say(
            f"derivatives: {row} scaling {scaling:g}: kept " + ", ".join(f"{d} {v:.2f}" for d, (v, _) in values.items())
        )
    model.load_state_dict(base_state)
    return models_summary(work, rows)


def models_summary(work: Path, rows: dict[str, Any]) -> dict[str, Any]:
    """The models part from its caches: ``rows``, the mean eval losses of C and the inputs, the inputs' records."""
    reference = json.loads((work / "models_reference.json").read_text())
    means = {name: {d: sum(v) / len(v) for d, v in entry["eval"].items()} for name, entry in reference.items()}
    stages = {d: json.loads((work / "stages" / f"derive-{d}.json").read_text()) for d in DOMAINS}
    return {"rows": rows, "eval_loss": means, "windows": {d: len(reference["C"]["eval"][d]) for d in DOMAINS},
            "derivatives": stages, "planned": [row for row, *_ in METHODS]}  # fmt: skip
