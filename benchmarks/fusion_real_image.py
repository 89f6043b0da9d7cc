"""The image part of the real fusion benchmark: two concept LoRAs of the tiny text-to-image world, fused.

Used by ``benchmarks/fusion_real.py``. The world is the diffusion benchmark's
(:mod:`diffusion_world`): S, a pixel-space ``UNet2DConditionModel`` with a tiny CLIP text
encoder trained on drawn ``"a <colour> <shape>"`` images, here with one more word in its
vocabulary. Two concept LoRAs (rank 4, UNet attention / feed-forward / 1x1 and 3x3 convs and
the text encoder) are trained on S with the same recipe: ``zorp`` draws purple shapes (saved
as a **kohya** file) and ``blorf`` orange ones (saved as a **diffusers** file).

``loraport.fuse`` merges the two files (mixed formats, so with ``base=S``) by every adapter
method; the fused file is written as kohya (the first input's format) and read back, so what
is scored is what a user would load. Per concept ``c``, on held-out noisy images of that
concept with its trigger prompt: ``e = eps(S + LoRA) - eps(S)``, the *effect error*
``||e_merged - e_c||^2 / ||e_c||^2`` (0: the concept's own LoRA, 1: no effect) and the *effect
kept* ``1 - error``. The task-vector scaling is chosen on a dev probe (other images, noise
and timesteps) by the worst concept's effect kept.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusion_world import (
    NEW_COLOUR,
    SECOND_COLOUR,
    SECOND_TRIGGER,
    SHAPES,
    TRIGGER,
    WORDS,
    Recipe,
    TinySD,
    batch,
    merged,
    noisy,
    regular,
    scheduler,
    tokens,
    train,
    train_lora,
)
from fusion_real_lora import say

CONCEPTS = {TRIGGER: NEW_COLOUR[1], SECOND_TRIGGER: SECOND_COLOUR}
FILES = {TRIGGER: "zorp.safetensors", SECOND_TRIGGER: "blorf-diffusers.safetensors"}
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("average", "average", {}),
    ("task arithmetic", "task_arithmetic", {}),
    ("TIES d=0.2", "ties", {"density": 0.2}),
    ("DARE d=0.5", "dare", {"density": 0.5}),
    ("TSV", "tsv", {}),
    ("Iso-C", "iso_c", {}),
    ("Iso-CTS", "iso_cts", {}),
]
SCALINGS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
TIMESTEPS = (50, 250, 450, 650, 850)


def probe(trigger: str, seed: int, per_t: int = 32) -> tuple[torch.Tensor, ...]:
    """Noisy images of one concept at fixed timesteps, its prompts, the noise."""
    gen = torch.Generator().manual_seed(seed)
    sched = scheduler()
    xs, ts, prompts = [], [], []
    for t in TIMESTEPS:
        x0, _, _, shapes = batch(gen, per_t, {trigger: CONCEPTS[trigger]})
        noise = torch.randn(x0.shape, generator=gen)
        tt = torch.full((per_t,), t)
        xs.append(noisy(sched, x0, noise, tt))
        ts.append(tt)
        prompts += [f"a {trigger} {SHAPES[s]}" for s in shapes]
    return torch.cat(xs), torch.cat(ts), tokens(prompts)


@torch.no_grad()
def predict(model: TinySD, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, t, ids = data
    return torch.cat([model(x[i : i + 64], t[i : i + 64], ids[i : i + 64]) for i in range(0, len(t), 64)])


def add_word(path: Path, seed: int = 0) -> int:
    """Append one token row (``blorf``) to S's text encoder, random like the never-trained rows; returns the vocab."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
    rows = encoder.get_input_embeddings().weight.shape[0]
    if rows < 3 + len(WORDS) + 1:
        torch.manual_seed(seed)
        encoder.resize_token_embeddings(3 + len(WORDS) + 1, mean_resizing=False)
        encoder.save_pretrained(str(path / "text_encoder"))
    return int(encoder.get_input_embeddings().weight.shape[0])


def build_world(work: Path, recipe: Recipe) -> dict[str, Any]:
    """S and the two concept LoRAs; each cached by its file.

    S is the diffusion benchmark's S (same seed, vocabulary and training), then one embedding row
    is appended for the second concept's word: untrained, as the rows of ``zorp`` and ``purple``
    are (S never sees any of them).
    """
    manifest_path = work / "manifest.json"
    if manifest_path.exists():
        return json.loads(manifest_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"recipe": recipe.__dict__}
    if not (work / "S" / "unet").is_dir():
        started = time.perf_counter()
        model = TinySD.new(seed=0)
        gen = torch.Generator().manual_seed(0)
        params = list(model.parameters())
        losses = train(model, params, recipe.base_steps, recipe.base_lr, gen, regular(), None, recipe.batch)
        model.save(work / "S")
        out["S"] = {"steps": recipe.base_steps, "final_loss": sum(losses[-50:]) / 50}
        out["S"]["seconds"] = time.perf_counter() - started
        say(f"image world: S trained, loss {out['S']['final_loss']:.4f}")
    out["S_vocabulary"] = add_word(work / "S")
    for trigger, colour in CONCEPTS.items():
        fmt = "diffusers" if trigger == SECOND_TRIGGER else "kohya"
        out[trigger] = {"file": FILES[trigger], "format": fmt}
        if not (work / FILES[trigger]).exists():
            started = time.perf_counter()
            train_lora(work / "S", work / FILES[trigger], recipe, 0, trigger, colour, fmt)
            out[trigger]["seconds"] = time.perf_counter() - started
            say(f"image world: {trigger} LoRA ({fmt}) trained")
    manifest_path.write_text(json.dumps(out, indent=1))
    return out


def run_image(work: Path) -> dict[str, Any]:
    from loraport import fuse
    from loraport.diffusion import DiffusionBase, read_diffusion_lora

    recipe = Recipe()
    manifest = build_world(work, recipe)
    base = TinySD.load(work / "S")
    with DiffusionBase.open(work / "S") as sd:
        own = {c: read_diffusion_lora(work / FILES[c], sd).adapter.modules for c in CONCEPTS}
    probes = {(c, split): probe(c, seed) for c in CONCEPTS for split, seed in (("dev", 11), ("eval", 1234))}
    base_eps = {key: predict(base, data) for key, data in probes.items()}
    effect = {key: predict(merged(base, own[key[0]]), data) - base_eps[key] for key, data in probes.items()}

    def scores(modules: dict[str, Any], split: str) -> dict[str, dict[str, float]]:
        model = merged(base, modules)
        out = {}
        for c in CONCEPTS:
            e = (predict(model, probes[(c, split)]) - base_eps[(c, split)]).flatten()
            o = effect[(c, split)].flatten()
            error = float((e - o).pow(2).sum() / o.pow(2).sum())
            out[c] = {
                "effect_error": error,
                "effect_kept": 1 - error,
                "cosine": float(e @ o / (e.norm() * o.norm())),
                "projection": float(e @ o / (o @ o)),
            }
        return out

    rows: dict[str, Any] = {}
    files = [work / FILES[c] for c in CONCEPTS]
    for row, method, settings in METHODS:
        out = work / "fused" / f"{method}.safetensors"
        started = time.perf_counter()
        result = fuse(
            files[0], files[1], out, base=work / "S", method=method, overwrite=True, progress=False, **settings
        )
        seconds = time.perf_counter() - started
        with DiffusionBase.open(work / "S") as sd:
            written = read_diffusion_lora(out, sd)
        fused = written.adapter.modules

        def scaled(s: float, fused: dict[str, Any] = fused) -> dict[str, Any]:
            from dataclasses import replace

            return {n: replace(m, B=m.B * s) for n, m in fused.items()}

        tried = []
        for s in SCALINGS if method != "average" else (1.0,):
            dev = scores(scaled(s), "dev")
            kept = [v["effect_kept"] for v in dev.values()]
            tried.append((s, min(kept), sum(kept) / len(kept)))
        scaling = max(tried, key=lambda item: (item[1], item[2]))[0]
        rows[row] = {
            "method": method,
            "scaling": scaling,
            "dev_tried": tried,
            "eval": scores(scaled(scaling), "eval"),
            "fuse_seconds": seconds,
            "written_format": written.format,
            "rank": max(m.rank for m in fused.values()),
            "notes": result.report.notes,
        }
        worst = min(v["effect_kept"] for v in rows[row]["eval"].values())
        say(f"image: {row} scaling {scaling:g}: worst effect kept {worst:.3f}")
    both = {**own[TRIGGER], **{n: m for n, m in own[SECOND_TRIGGER].items() if n not in own[TRIGGER]}}
    cross = {c: scores(own[c], "eval") for c in CONCEPTS}  # each LoRA alone, on both concepts
    return {"manifest": manifest, "rows": rows, "alone": cross, "modules": len(both)}
