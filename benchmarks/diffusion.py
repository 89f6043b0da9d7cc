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
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraport.zoo.tiny_diffusion import CLIP_TARGETS
from loraport.zoo.tiny_diffusion import UNET_TARGETS as LORA_UNET

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "cyan": (0.1, 0.85, 0.9),
    "white": (0.95, 0.95, 0.95),
}
NEW_COLOUR = ("purple", (0.6, 0.05, 0.85))
TRIGGER = "zorp"
OTHER = len(COLOURS) + 1  # the classifier's class for colours off the palette (blends, greys, ...)
SHAPES = ("circle", "square", "triangle", "cross")
WORDS = ["a", *COLOURS, NEW_COLOUR[0], TRIGGER, *SHAPES]
PAD, BOS, EOS = 0, 1, 2
SEQ = 6
SIZE = 16
UNET_TARGETS = [*LORA_UNET, "conv1", "conv2"]  # attention, feed-forward, proj_in / proj_out, resnet convs
TE_TARGETS = list(CLIP_TARGETS)
METHODS = [("identity", None), *((m, k) for k in (8, 16) for m in ("project", "lorax", "procrustes", "prolora"))]
EVAL_TIMESTEPS = (50, 250, 450, 650, 850)


@dataclass
class Recipe:
    """Training settings (recorded in the results)."""

    base_steps: int = 1200
    base_lr: float = 2e-3
    drift_lr: float = 2e-3
    drift_max_steps: int = 800
    drift_targets: dict[str, float] = field(default_factory=lambda: {"D5": 0.05, "D15": 0.15, "D30": 0.30})
    lora_steps: int = 200
    lora_lr: float = 5e-3
    lora_rank: int = 4
    lora_alpha: float = 4.0
    batch: int = 32
    classifier_steps: int = 800


# -- data -----------------------------------------------------------------------------------


def tokens(prompts: list[str]) -> torch.Tensor:
    """Word-level ids: ``[BOS, words..., EOS, PAD...]`` (length ``SEQ``)."""
    ids = torch.full((len(prompts), SEQ), PAD, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        words = [3 + WORDS.index(w) for w in prompt.split()]
        row = [BOS, *words, EOS]
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def draw(shape: str, rgb: tuple[float, float, float], gen: torch.Generator, shifted: bool = False) -> torch.Tensor:
    """One ``(3, SIZE, SIZE)`` image in ``[-1, 1]``: a filled shape at a jittered position."""
    y, x = torch.meshgrid(
        torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij"
    )
    low, high = (4.5, 6.5) if shifted else (3.0, 5.5)
    r = low + (high - low) * float(torch.rand((), generator=gen))
    cx, cy = ((SIZE - 1) / 2 + torch.rand(2, generator=gen) * 4 - 2).tolist()
    dx, dy = (x - cx).abs(), (y - cy).abs()
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = (dx <= 0.8 * r) & (dy <= 0.8 * r)
    elif shape == "triangle":
        top = cy - r
        mask = (y >= top) & (y <= cy + 0.8 * r) & (dx <= (y - top) * 0.6)
    else:
        mask = ((dx <= r / 3) & (dy <= r)) | ((dy <= r / 3) & (dx <= r))
    background = 0.3 if shifted else 0.0
    image = torch.full((3, SIZE, SIZE), background)
    colour = torch.tensor(rgb)[:, None, None].expand(3, SIZE, SIZE)
    image = torch.where(mask[None], colour, image)
    image = image + 0.02 * torch.randn(image.shape, generator=gen)
    return image.clamp(0, 1) * 2 - 1


def batch(
    gen: torch.Generator, n: int, colours: dict[str, tuple[float, float, float]], shifted: bool = False
) -> tuple[torch.Tensor, list[str], list[int], list[int]]:
    """``n`` images with prompts ``"a <colour word> <shape>"`` and their colour / shape labels."""
    names = list(colours)
    images, prompts, colour_ids, shape_ids = [], [], [], []
    for _ in range(n):
        c = int(torch.randint(len(names), (), generator=gen))
        s = int(torch.randint(len(SHAPES), (), generator=gen))
        images.append(draw(SHAPES[s], colours[names[c]], gen, shifted))
        prompts.append(f"a {names[c]} {SHAPES[s]}")
        colour_ids.append(c)
        shape_ids.append(s)
    return torch.stack(images), prompts, colour_ids, shape_ids


# -- the model ------------------------------------------------------------------------------


def unet_config() -> dict[str, Any]:
    return dict(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def text_config() -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=3 + len(WORDS),
        max_position_embeddings=SEQ,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


class TinySD(torch.nn.Module):
    """A UNet and a text encoder: ``forward(x_t, t, ids)`` predicts the noise."""

    def __init__(self, unet: Any, text_encoder: Any) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    @classmethod
    def new(cls, seed: int) -> TinySD:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        torch.manual_seed(seed)
        return cls(UNet2DConditionModel(**unet_config()), CLIPTextModel(text_config()))

    @classmethod
    def load(cls, path: Path) -> TinySD:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        return cls(
            UNet2DConditionModel.from_pretrained(path / "unet"), CLIPTextModel.from_pretrained(path / "text_encoder")
        )

    def save(self, path: Path) -> None:
        self.unet.save_pretrained(str(path / "unet"))
        self.text_encoder.save_pretrained(str(path / "text_encoder"))

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        states = self.text_encoder(ids).last_hidden_state
        return self.unet(x, t, states).sample

    def weights(self) -> dict[str, torch.Tensor]:
        """Every linear / conv weight (what drift is measured on)."""
        return {
            n: p.detach().clone()
            for n, p in self.named_parameters()
            if n.endswith("weight") and p.ndim in (2, 4) and "embedding" not in n
        }


def scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def noisy(sched: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return sched.add_noise(x0, noise, t)


def relative_drift(model: TinySD, source: dict[str, torch.Tensor]) -> float:
    weights = model.weights()
    diff = sum(float((weights[n] - w).pow(2).sum()) for n, w in source.items())
    return math.sqrt(diff / sum(float(w.pow(2).sum()) for w in source.values()))


def train(
    model: TinySD,
    params: list[torch.nn.Parameter],
    steps: int,
    lr: float,
    gen: torch.Generator,
    sample: Any,
    on_step: Any = None,
    batch_size: int = 32,
) -> list[float]:
    """Denoising training; ``sample(gen, n)`` gives images and prompts; 10 % of prompts dropped (guidance)."""
    sched = scheduler()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        x0, prompts = sample(gen, batch_size)
        prompts = ["" if float(torch.rand((), generator=gen)) < 0.1 else p for p in prompts]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        loss = torch.nn.functional.mse_loss(model(noisy(sched, x0, noise, t), t, tokens(prompts)), noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:  # linear warm-up, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None and on_step(step) is False:
            break
    model.eval()
    return losses


def regular(shifted: bool = False) -> Any:
    def sample(gen: torch.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
        x0, prompts, _, _ = batch(gen, n, COLOURS, shifted)
        return x0, prompts

    return sample


def concept_and_prior(gen: torch.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """Half the batch the new concept (``a zorp <shape>``, purple), half regular images (prior preservation)."""
    x_new, _, _, shapes = batch(gen, n // 2, {TRIGGER: NEW_COLOUR[1]})
    x_old, prompts, _, _ = batch(gen, n - n // 2, COLOURS)
    return torch.cat([x_new, x_old]), [f"a {TRIGGER} {SHAPES[s]}" for s in shapes] + prompts


# -- building the zoo -----------------------------------------------------------------------


def build(work: Path, recipe: Recipe, log: Any) -> dict[str, Any]:
    manifest_path = work / "manifest.json"
    if manifest_path.exists():
        return json.loads(manifest_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"recipe": asdict(recipe), "models": {}, "loras": {}}
    started = time.perf_counter()
    model = TinySD.new(seed=0)
    gen = torch.Generator().manual_seed(0)
    params = list(model.parameters())
    losses = train(model, params, recipe.base_steps, recipe.base_lr, gen, regular(), batch_size=recipe.batch)
    model.save(work / "S")
    manifest["models"]["S"] = {
        "drift": 0.0,
        "steps": recipe.base_steps,
        "final_loss": sum(losses[-50:]) / 50,
        "seconds": time.perf_counter() - started,
    }
    log(f"S: {recipe.base_steps} steps, loss {manifest['models']['S']['final_loss']:.4f}")

    started = time.perf_counter()
    source = model.weights()
    pending = sorted(recipe.drift_targets.items(), key=lambda kv: kv[1])
    gen = torch.Generator().manual_seed(1)

    def snapshot(step: int) -> bool:
        drift = relative_drift(model, source)
        while pending and drift >= pending[0][1]:
            name, _ = pending.pop(0)
            model.save(work / name)
            manifest["models"][name] = {"drift": drift, "steps": step + 1, "seconds": time.perf_counter() - started}
            log(f"{name}: drift {drift:.3f} after {step + 1} further steps")
        return bool(pending)

    train(model, params, recipe.drift_max_steps, recipe.drift_lr, gen, regular(shifted=True), snapshot, recipe.batch)
    for name, _ in pending:  # not reached: the last snapshot stands in, and says so
        model.save(work / name)
        drift = relative_drift(model, source)
        manifest["models"][name] = {"drift": drift, "steps": recipe.drift_max_steps, "note": "target drift not reached"}
        log(f"{name}: drift target not reached ({drift:.3f})")

    # One LoRA per model, the same recipe and seed; a second seed on S measures the seed-to-seed spread.
    for name, seed in [("S", 0), *((n, 0) for n in recipe.drift_targets), ("S", 1)]:
        started = time.perf_counter()
        label = name if seed == 0 else f"{name}-seed{seed}"
        path = work / "loras" / f"{label}.safetensors"
        train_lora(work / name, path, recipe, seed)
        manifest["loras"][label] = {"path": str(path.relative_to(work)), "seconds": time.perf_counter() - started}
        log(f"LoRA on {name} (seed {seed}): {manifest['loras'][label]['seconds']:.0f} s")
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def train_lora(base: Path, out: Path, recipe: Recipe, seed: int = 0) -> Path:
    """Train the concept LoRA (PEFT) on ``base`` and save it as a kohya file with loraport's writer."""
    from peft import LoraConfig, inject_adapter_in_model

    from loraport.adapters import LoraModule
    from loraport.diffusion import DiffusionBase
    from loraport.diffusion.formats import write_kohya

    model = TinySD.load(base)
    model.requires_grad_(False)
    torch.manual_seed(7 + seed)
    config = dict(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, init_lora_weights="gaussian")
    inject_adapter_in_model(LoraConfig(**config, target_modules=UNET_TARGETS), model.unet)
    inject_adapter_in_model(LoraConfig(**config, target_modules=TE_TARGETS), model.text_encoder)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(2 + seed)
    train(model, params, recipe.lora_steps, recipe.lora_lr, gen, concept_and_prior, batch_size=recipe.batch)
    modules: dict[str, LoraModule] = {}
    for component, part in (("unet", model.unet), ("text_encoder", model.text_encoder)):
        state = {n: p.detach().clone() for n, p in part.named_parameters() if ".lora_" in n}
        for key, A in state.items():
            if ".lora_A." not in key:
                continue
            name = key.split(".lora_A.")[0]
            if component == "text_encoder" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # transformers >= 5 CLIPTextModel: LoRA files keep text_model.
            B = state[key.replace(".lora_A.", ".lora_B.")]
            full = f"{component}.{name}"
            modules[full] = LoraModule.from_stored(full, A, B, recipe.lora_alpha)
    out.parent.mkdir(parents=True, exist_ok=True)
    with DiffusionBase.open(base) as sd:
        meta = {"ss_network_module": "networks.lora", "ss_output_name": f"zorp-{base.name}"}
        write_kohya(out, modules, sd, "diffusers", meta, {"ss_sd_model_name": base.name}, torch.float32)
    return out


# -- evaluation -----------------------------------------------------------------------------


def merged(model: TinySD, modules: dict[str, Any]) -> TinySD:
    """A copy of ``model`` with the LoRA's dense updates added (``scale * B @ A``, conv reshaped)."""
    import copy

    out = copy.deepcopy(model)
    parts = {"unet": out.unet, "text_encoder": out.text_encoder}
    with torch.no_grad():
        for name, module in modules.items():
            component, _, path = name.partition(".")
            target = parts[component]
            path = path.removeprefix("text_model.") if not hasattr(target, "text_model") else path
            weight = target.get_submodule(path).weight
            weight += (module.scale * (module.B.double() @ module.A.double())).reshape(weight.shape).to(weight.dtype)
    return out


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


class Classifier(torch.nn.Module):
    """A small CNN: colour (six, purple, or off-palette) and shape of a drawn image, on either background."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 16, 64),
            torch.nn.ReLU(),
        )
        self.colour = torch.nn.Linear(64, OTHER + 1)
        self.shape = torch.nn.Linear(64, len(SHAPES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.colour(h), self.shape(h)


def off_palette(gen: torch.Generator, margin: float = 0.3) -> tuple[float, float, float]:
    """A random colour farther than ``margin`` from every palette colour (purple included)."""
    palette = torch.tensor([*COLOURS.values(), NEW_COLOUR[1]])
    while True:
        rgb = torch.rand(3, generator=gen)
        if float((palette - rgb).norm(dim=1).min()) > margin:
            return tuple(rgb.tolist())  # type: ignore[return-value]


def classifier_batch(gen: torch.Generator, n: int, shifted: bool) -> tuple[torch.Tensor, list[int], list[int]]:
    """Drawn images in the seven named colours, and a quarter in off-palette colours (class ``OTHER``)."""
    colours = {**COLOURS, NEW_COLOUR[0]: NEW_COLOUR[1]}
    x, _, c, s = batch(gen, n - n // 4, colours, shifted)
    others = [(int(torch.randint(len(SHAPES), (), generator=gen)), off_palette(gen)) for _ in range(n // 4)]
    x_other = torch.stack([draw(SHAPES[shape], rgb, gen, shifted) for shape, rgb in others])
    return torch.cat([x, x_other]), c + [OTHER] * len(others), s + [shape for shape, _ in others]


def train_classifier(steps: int) -> tuple[Classifier, float, float]:
    gen = torch.Generator().manual_seed(99)
    net = Classifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(steps):
        x, c, s = classifier_batch(gen, 64, shifted=step % 2 == 1)
        logits_c, logits_s = net(x)
        loss = torch.nn.functional.cross_entropy(logits_c, torch.tensor(c)) + torch.nn.functional.cross_entropy(
            logits_s, torch.tensor(s)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, c, s = classifier_batch(gen, 512, shifted=False)
    with torch.no_grad():
        logits_c, logits_s = net(x)
    acc_c = float((logits_c.argmax(1) == torch.tensor(c)).float().mean())
    acc_s = float((logits_s.argmax(1) == torch.tensor(s)).float().mean())
    return net, acc_c, acc_s


@torch.no_grad()
def sample(model: TinySD, prompts: list[str], seed: int, steps: int = 100, guidance: float = 3.0) -> torch.Tensor:
    """Ancestral (DDPM) sampling with classifier-free guidance.

    On this tiny model DDIM at 25-50 steps leaves visible noise in every image; DDPM at 100
    steps gives clean shapes (checked by eye on a grid of samples).
    """
    sched = scheduler()
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((len(prompts), 3, SIZE, SIZE), generator=gen)
    cond = model.text_encoder(tokens(prompts)).last_hidden_state
    uncond = model.text_encoder(tokens([""] * len(prompts))).last_hidden_state
    states = torch.cat([uncond, cond])
    for t in sched.timesteps:
        eps_u, eps_c = model.unet(torch.cat([x, x]), t, states).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, generator=gen).prev_sample
    return x.clamp(-1, 1)


def prompt_fidelity(model: TinySD, classifier: Classifier, quick: bool = False) -> tuple[float, float]:
    """Does the model draw what it is asked? Classifier colour / shape accuracy on samples of every regular prompt."""
    pairs = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]
    if quick:
        pairs = pairs[::3]
    names = list(COLOURS)
    images = sample(model, [f"a {names[c]} {SHAPES[s]}" for c, s in pairs], seed=11)
    with torch.no_grad():
        logits_c, logits_s = classifier(images)
    colours = torch.tensor([c for c, _ in pairs])
    shapes = torch.tensor([s for _, s in pairs])
    return float((logits_c.argmax(1) == colours).float().mean()), float((logits_s.argmax(1) == shapes).float().mean())


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
    classifier: Classifier,
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
            logits_c, logits_s = classifier(images)
        result.purple = float((logits_c.argmax(1) == len(COLOURS)).float().mean())
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
    log(f"classifier: colour {acc_c:.3f}, shape {acc_s:.3f} on held-out drawn images")
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
        common = (probe, (base_loss, oracle_loss), classifier, samples)
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
        f"{max(r['loss_recovery'] for r in subspace):.2f}; at most {max(r['purple'] or 0 for r in subspace):.2f} "
        "of their samples are purple. As for the LLM "
        "zoo (SPEC sec. 9), a standard LoRA lies mostly outside the base's top-k subspaces.",
        "- Sampled images: the models follow colour words (prompt fidelity above) better than shape words "
        "(S: near chance), so the *shape* column is mostly noise; 32 samples per row give a standard error "
        "of about 0.09 on *purple*.",
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
        f"Classifier on held-out drawn images: colour {data['classifier']['colour_accuracy']:.3f}, "
        f"shape {data['classifier']['shape_accuracy']:.3f}.",
        "",
        "## Ported LoRA vs the oracle, per target",
        "",
        "effect error: `||e_port - e_oracle||^2 / ||e_oracle||^2` (0 = the oracle's effect, 1 = none); "
        "cos: cosine of the two effects; loss recovery: `(L_T - L_port) / (L_T - L_oracle)`; purple / shape: "
        "sampled trigger images the classifier calls purple / the prompted shape.",
        "",
        "| target | method | k | effect error | cos | loss | loss recovery | purple | shape | kept energy | sim |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['target']} | {r['method']} | {r['k'] or '-'} | {fmt(r['effect_error'])} | "
            f"{fmt(r['effect_cosine'])} | {fmt(r['loss'], 4)} | {fmt(r['loss_recovery'], 2)} | "
            f"{fmt(r['purple'], 2)} | {fmt(r['shape'], 2)} | {fmt(r['kept_energy'])} | {fmt(r['sim'])} |"
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
