"""Diffusion LoRA porting on a tiny trained text-to-image model (issue 12).

    python benchmarks/diffusion.py              # ~15 min on 2 shared cores the first time; writes
                                                # benchmarks/results/diffusion.md (and .json)
    python benchmarks/diffusion.py --quick      # smoke test: a few hundred steps, not a result

Models are cached under ``benchmarks/work/diffusion/`` (delete it, or ``--fresh``, to retrain).

1. **S**: a pixel-space text-conditioned UNet (diffusers ``UNet2DConditionModel``, SD-1.x
   style: 1x1-conv ``proj_in`` / ``proj_out``) and a tiny CLIP text encoder, trained from
   scratch on procedurally drawn 16x16 images: ``"a <colour> <shape>"``, six colours, four
   shapes, on black.
2. **D5 / D15 / D30**: S trained further on a shifted distribution (grey backgrounds,
   bigger shapes), snapshots when the relative weight drift ``||W_D - W_S|| / ||W_S||``
   (all linear and conv weights) first reaches 5 / 15 / 30 %.
3. **The LoRA**: rank 4 on every attention, feed-forward, ``proj_in`` / ``proj_out`` (1x1
   conv) and resnet 3x3 conv (LoCon) of the UNet and q/k/v/out/fc1/fc2 of the text encoder,
   trained on S to draw a colour S never saw (purple) for the trigger word ``zorp``; saved
   as a kohya file. **Oracles**: the same recipe trained on each target.
4. **Ports**: ``loraport.transfer`` of the kohya file from S to each target with every method.

Scored per target and method, on held-out images of the new concept:

- *effect error*: ``||e_port - e_oracle||^2 / ||e_oracle||^2`` where ``e = eps(T + LoRA) -
  eps(T)`` is the LoRA's change of the noise prediction (held-out trigger prompts, images,
  noise, timesteps 50..850): 0 = the oracle's effect, 1 = no effect (the bare target);
- *loss recovery*: ``(L_T - L_port) / (L_T - L_oracle)`` of the denoising loss on those images;
- *purple*: share of images sampled (DDPM, 100 steps, guidance 3) for ``"a zorp <shape>"``
  that a small CNN trained on drawn images (the seven colours, and off-palette colours as an
  eighth class) classifies as purple; *shape*: its shape accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusion_world import (
    COLOURS,
    NEW_COLOUR,
    SHAPES,
    TRIGGER,
    Classifier,
    Recipe,
    TinySD,
    batch,
    build,
    merged,
    noisy,
    prompt_fidelity,
    sample,
    scheduler,
    tokens,
    train_classifier,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = [("identity", None), *((m, k) for k in (8, 16) for m in ("project", "lorax", "procrustes", "prolora"))]
EVAL_TIMESTEPS = (50, 250, 450, 650, 850)


@dataclass
class Probe:
    """Held-out noisy concept images, prompts and noise for the noise-prediction metrics."""

    x_t: torch.Tensor
    t: torch.Tensor
    ids: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def make(cls, per_t: int = 32) -> Probe:
        gen = torch.Generator().manual_seed(1234)
        sched = scheduler()
        xs, ts, prompts, noises = [], [], [], []
        for t in EVAL_TIMESTEPS:
            x0, _, _, shapes = batch(gen, per_t, {TRIGGER: NEW_COLOUR[1]})
            noise = torch.randn(x0.shape, generator=gen)
            tt = torch.full((per_t,), t)
            xs.append(noisy(sched, x0, noise, tt))
            ts.append(tt)
            noises.append(noise)
            prompts += [f"a {TRIGGER} {SHAPES[s]}" for s in shapes]
        return cls(torch.cat(xs), torch.cat(ts), tokens(prompts), torch.cat(noises))

    @torch.no_grad()
    def predict(self, model: TinySD, chunk: int = 64) -> torch.Tensor:
        return torch.cat(
            [
                model(self.x_t[i : i + chunk], self.t[i : i + chunk], self.ids[i : i + chunk])
                for i in range(0, len(self.t), chunk)
            ]
        )


@dataclass
class Score:
    target: str
    method: str
    k: int | None = None
    effect_error: float | None = None
    effect_cosine: float | None = None
    loss: float | None = None
    loss_recovery: float | None = None
    purple: float | None = None
    purple_other: float | None = None  # the same samples, a second classifier (another seed)
    shape: float | None = None
    kept_energy: float | None = None
    sim: float | None = None
    port_seconds: float | None = None


def score(
    name: str,
    method: str,
    k: int | None,
    model: TinySD,
    base_eps: torch.Tensor,
    oracle_effect: torch.Tensor | None,
    probe: Probe,
    losses: tuple[float, float] | None,
    classifiers: list[Classifier],
    samples: int,
) -> Score:
    eps = probe.predict(model)
    result = Score(name, method, k)
    effect = (eps - base_eps).flatten()
    if oracle_effect is not None:
        o = oracle_effect.flatten()
        result.effect_error = float((effect - o).pow(2).sum() / o.pow(2).sum())
        norm = float(effect.norm() * o.norm())
        result.effect_cosine = float(effect @ o) / norm if norm > 0 else 0.0
    result.loss = float((eps - probe.noise).pow(2).mean())
    if losses is not None:
        base_loss, oracle_loss = losses
        gap = base_loss - oracle_loss
        result.loss_recovery = (base_loss - result.loss) / gap if abs(gap) > 1e-9 else None
    if samples:
        prompts = [f"a {TRIGGER} {SHAPES[i % len(SHAPES)]}" for i in range(samples)]
        images = sample(model, prompts, seed=5)
        with torch.no_grad():
            (logits_c, logits_s), (other_c, _) = (net(images) for net in classifiers)
        result.purple = float((logits_c.argmax(1) == len(COLOURS)).float().mean())
        result.purple_other = float((other_c.argmax(1) == len(COLOURS)).float().mean())
        expected = torch.tensor([i % len(SHAPES) for i in range(samples)])
        result.shape = float((logits_s.argmax(1) == expected).float().mean())
    return result


# -- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from loraport import transfer
    from loraport.diffusion import DiffusionBase, read_diffusion_lora

    torch.set_num_threads(args.threads)
    recipe = Recipe()
    if args.quick:
        recipe = Recipe(base_steps=150, drift_max_steps=200, lora_steps=40, classifier_steps=100)
    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    logs: list[str] = []

    def log(text: str) -> None:
        logs.append(text)
        print(text, file=sys.stderr, flush=True)

    started = time.perf_counter()
    manifest = build(work, recipe, log)
    built = time.perf_counter() - started
    classifier, acc_c, acc_s = train_classifier(recipe.classifier_steps)
    second, acc_c2, acc_s2 = train_classifier(recipe.classifier_steps, seed=100)
    log(f"classifiers: colour {acc_c:.3f} / {acc_c2:.3f}, shape {acc_s:.3f} / {acc_s2:.3f} on held-out drawn images")
    probe = Probe.make(per_t=8 if args.quick else 32)
    samples = 8 if args.quick else args.samples
    source_lora = work / manifest["loras"]["S"]["path"]
    rows: list[Score] = []
    fidelity: dict[str, tuple[float, float]] = {}

    def lora_modules(model: str, lora: str) -> dict[str, Any]:
        with DiffusionBase.open(work / model) as sd:
            return read_diffusion_lora(work / manifest["loras"][lora]["path"], sd).adapter.modules

    for name in ["S", *recipe.drift_targets]:
        target = TinySD.load(work / name)
        fidelity[name] = prompt_fidelity(target, classifier, quick=args.quick)
        log(f"{name}: prompt fidelity colour {fidelity[name][0]:.2f}, shape {fidelity[name][1]:.2f}")
        base_eps = probe.predict(target)
        oracle = merged(target, lora_modules(name, name))
        oracle_eps = probe.predict(oracle)
        oracle_effect = oracle_eps - base_eps
        base_loss = float((base_eps - probe.noise).pow(2).mean())
        oracle_loss = float((oracle_eps - probe.noise).pow(2).mean())
        common = (probe, (base_loss, oracle_loss), [classifier, second], samples)
        rows.append(score(name, "base (no LoRA)", None, target, base_eps, oracle_effect, *common))
        rows.append(score(name, "oracle (LoRA trained on it)", None, oracle, base_eps, oracle_effect, *common))
        if name == "S":  # the floor: the same recipe with another seed, against the oracle
            other = merged(target, lora_modules("S", "S-seed1"))
            rows.append(score(name, "oracle, other seed", None, other, base_eps, oracle_effect, *common))
        for method, k in METHODS if name != "S" else [("identity", None)]:
            t0 = time.perf_counter()
            result = transfer(
                source_lora,
                work / "S",
                work / name,
                method=method,
                subspace_rank=k or 64,
                svd="exact",
                progress=False,
                use_cache=False,
            )
            seconds = time.perf_counter() - t0
            ported = merged(target, result.adapter.modules)
            row = score(name, method, k, ported, base_eps, oracle_effect, *common)
            totals = result.report.totals()
            row.kept_energy, row.sim, row.port_seconds = totals["mean_kept_energy"], totals["mean_similarity"], seconds
            rows.append(row)
            log(f"{name} {method} k={k}: effect error {row.effect_error:.3f}, purple {row.purple}")
    return {
        "recipe": asdict(recipe),
        "manifest": manifest,
        "classifier": {"colour_accuracy": acc_c, "shape_accuracy": acc_s},
        "classifier_other": {"colour_accuracy": acc_c2, "shape_accuracy": acc_s2},
        "prompt_fidelity": fidelity,
        "rows": [asdict(r) for r in rows],
        "seconds": {"build (cached: 0)": built, "total": time.perf_counter() - started},
        "log": logs,
    }


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(rows: list[dict[str, Any]], target: str, method: str, k: int | None = None) -> dict[str, Any]:
    return next(r for r in rows if r["target"] == target and r["method"] == method and r["k"] == k)


def headline(data: dict[str, Any]) -> list[str]:
    """Per target: the bare target, the oracle, copying, and the best port by effect error (all from the rows)."""
    rows = data["rows"]
    lines = [
        "## Headline",
        "",
        "Per target: effect error (lower is better; the floor, two oracles of different seeds on S, is "
        f"{_row(rows, 'S', 'oracle, other seed')['effect_error']:.3f}), loss recovery and purple rate of copying "
        "(`identity`), of the best port by effect error, and of the best pure subspace method "
        "(`project` / `lorax` / `procrustes`).",
        "",
        "| target | drift | purple: base / oracle | identity | best port (k) | best subspace method (k) |",
        "|---|---:|---|---|---|---|",
    ]

    def cell(r: dict[str, Any]) -> str:
        return f"{r['effect_error']:.3f} / {r['loss_recovery']:.2f} / {fmt(r['purple'], 2)}"

    for target, info in data["manifest"]["models"].items():
        if target == "S":
            continue
        ports = [r for r in rows if r["target"] == target and r["kept_energy"] is not None]
        best = min(ports, key=lambda r: r["effect_error"])
        subspace = min(
            (r for r in ports if r["method"] in ("project", "lorax", "procrustes")), key=lambda r: r["effect_error"]
        )
        base, oracle = _row(rows, target, "base (no LoRA)"), _row(rows, target, "oracle (LoRA trained on it)")
        lines.append(
            f"| {target} | {info['drift']:.2f} | {fmt(base['purple'], 2)} / {fmt(oracle['purple'], 2)} | "
            f"{cell(_row(rows, target, 'identity'))} | {best['method']} ({best['k'] or '-'}): {cell(best)} | "
            f"{subspace['method']} ({subspace['k']}): {cell(subspace)} |"
        )
    lines += ["", "Cells: effect error / loss recovery / purple.", ""]
    return lines


def build_note(data: dict[str, Any]) -> str:
    """How long the cached models took to train (from the manifest), and whether this run trained them."""
    models, loras = data["manifest"]["models"], data["manifest"]["loras"]
    base = models["S"]["seconds"]
    drift = max(info.get("seconds", 0.0) for name, info in models.items() if name != "S")
    lora = sum(info["seconds"] for info in loras.values())
    cached = data["seconds"]["build (cached: 0)"] < 1.0
    return (
        f"The models were trained {'by an earlier run (cached)' if cached else 'by this run'}: S {base:.0f} s, "
        f"the derivatives {drift:.0f} s, {len(loras)} LoRAs {lora:.0f} s ({base + drift + lora:.0f} s in all)."
    )


def notes(data: dict[str, Any]) -> list[str]:
    """What the table says, in numbers taken from it."""
    rows = [r for r in data["rows"] if r["target"] != "S"]
    targets = [t for t in data["manifest"]["models"] if t != "S"]

    def span(method: str, k: int | None, key: str) -> str:
        values = [_row(rows, t, method, k)[key] for t in targets]
        return f"{min(values):.2f}-{max(values):.2f}"

    subspace = [r for r in rows if r["method"] in ("project", "lorax", "procrustes")]
    gaps = [_row(rows, t, "prolora", 16)["effect_error"] - _row(rows, t, "identity")["effect_error"] for t in targets]
    disagreement = max(
        (abs(r["purple"] - r["purple_other"]) for r in data["rows"] if r.get("purple_other") is not None), default=0.0
    )
    return [
        "## Notes",
        "",
        f"- Copying the factors (`identity`) recovers {span('identity', None, 'loss_recovery')} of the oracle's "
        f"loss reduction on the trigger images (effect error {span('identity', None, 'effect_error')}); the "
        "same LoRA recipe with another seed is within "
        f"{_row(data['rows'], 'S', 'oracle, other seed')['effect_error']:.3f} of the oracle, so the gap is the "
        "targets' drift, not training noise.",
        f"- `prolora` (k = 16) differs from copying by {min(gaps):+.3f} to {max(gaps):+.3f} in effect error: "
        "with the complement kept, the subspace rotation changes little at these drifts.",
        f"- `project` / `lorax` / `procrustes` keep {min(r['kept_energy'] for r in subspace):.2f}-"
        f"{max(r['kept_energy'] for r in subspace):.2f} of the update's norm and recover at most "
        f"{max(r['loss_recovery'] for r in subspace):.2f}; their purple rate is at most "
        f"{max(r['purple'] or 0 for r in subspace):.2f}. As for the LLM "
        "zoo (SPEC sec. 9), a standard LoRA lies mostly outside the base's top-k subspaces.",
        "- Sampled images are the weak measure here: the models follow colour words (prompt fidelity above) "
        "better than shape words, so the *shape* column is mostly noise; 32 samples per row give a standard "
        "error of about 0.09 on *purple*, and two classifiers trained alike with other seeds disagree on the "
        f"purple rate of the same samples by up to {disagreement:.2f}. The noise-prediction measures (effect "
        "error, loss recovery) are deterministic and are the result.",
        "",
    ]


def markdown(data: dict[str, Any]) -> str:
    recipe = data["recipe"]
    models = data["manifest"]["models"]
    load = data["load_average"]
    command = data["command"]
    lines = [
        "# Diffusion LoRA porting on a tiny trained text-to-image model",
        "",
        f"Produced by `{command}` in {data['seconds']['total']:.0f} s, {data['threads']} torch thread(s) on a "
        f"shared 2-core machine (load average at the end {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}). "
        f"{build_note(data)} What is measured and how: the docstring of `benchmarks/diffusion.py`.",
        "",
        *headline(data),
        *notes(data),
        "## Models and drift",
        "",
        "| model | drift vs S | further steps | prompt fidelity: colour | shape | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, info in models.items():
        colour, shape = data["prompt_fidelity"].get(name, (None, None))
        steps = info["steps"] if name != "S" else "-"
        lines.append(
            f"| {name} | {info['drift']:.3f} | {steps} | {fmt(colour, 2)} | {fmt(shape, 2)} | {info.get('note', '')} |"
        )
    lines += [
        "",
        "Prompt fidelity: the classifier's colour / shape accuracy on one sample of each of the 24 regular prompts "
        "(does the model follow its text at all?).",
    ]
    lines += [
        "",
        f"Recipes: S {recipe['base_steps']} steps (AdamW, lr {recipe['base_lr']}, batch {recipe['batch']}); "
        f"derivatives: further training on grey backgrounds and bigger shapes, lr {recipe['drift_lr']}; "
        f"LoRA: rank {recipe['lora_rank']}, alpha {recipe['lora_alpha']}, {recipe['lora_steps']} steps, lr "
        f"{recipe['lora_lr']}, half trigger images (purple, `a zorp <shape>`), half regular ones. "
        f"Classifiers on held-out drawn images: colour {data['classifier']['colour_accuracy']:.3f} / "
        f"{data['classifier_other']['colour_accuracy']:.3f}, shape {data['classifier']['shape_accuracy']:.3f} / "
        f"{data['classifier_other']['shape_accuracy']:.3f}.",
        "",
        "## Ported LoRA vs the oracle, per target",
        "",
        "effect error: `||e_port - e_oracle||^2 / ||e_oracle||^2` (0 = the oracle's effect, 1 = none); "
        "cos: cosine of the two effects; loss recovery: `(L_T - L_port) / (L_T - L_oracle)`; purple / shape: "
        "sampled trigger images the classifier calls purple / the prompted shape; purple (2nd): the same "
        "images, a classifier trained with another seed.",
        "",
        "| target | method | k | effect error | cos | loss | loss recovery | purple | purple (2nd) | shape | "
        "kept energy | sim |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['target']} | {r['method']} | {r['k'] or '-'} | {fmt(r['effect_error'])} | "
            f"{fmt(r['effect_cosine'])} | {fmt(r['loss'], 4)} | {fmt(r['loss_recovery'], 2)} | "
            f"{fmt(r['purple'], 2)} | {fmt(r.get('purple_other'), 2)} | {fmt(r['shape'], 2)} | "
            f"{fmt(r['kept_energy'])} | {fmt(r['sim'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "diffusion"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diffusion.md"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=32, help="sampled images per row (0: skip sampling)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny training, not a result")
    parser.add_argument("--fresh", action="store_true", help="retrain everything")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json beside --out")
    args = parser.parse_args()
    if args.quick:
        args.work = str(Path(args.work).with_name("diffusion-quick"))
    out = Path(args.out) if not args.quick else Path(args.work) / "diffusion.md"
    if args.render:
        data = json.loads(out.with_suffix(".json").read_text())
    else:
        data = run(args)
        data["threads"] = args.threads
        data["command"] = ("python benchmarks/diffusion.py " + shlex.join(sys.argv[1:])).strip()
        data["load_average"] = list(os.getloadavg())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    out.write_text(markdown(data))
    print(out.read_text())


if __name__ == "__main__":
    main()
