"""The toy world of the diffusion benchmark: drawn images, a tiny text-to-image model, its training.

Used by ``benchmarks/diffusion.py`` (see its docstring for what is measured). Everything here is
seeded: procedural 16x16 images of coloured shapes with ``"a <colour> <shape>"`` prompts, a
pixel-space diffusers ``UNet2DConditionModel`` with a tiny CLIP text encoder, denoising training
(full and LoRA), DDPM sampling with guidance, and a small CNN that names colours and shapes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraport.zoo.tiny_diffusion import CLIP_TARGETS
from loraport.zoo.tiny_diffusion import UNET_TARGETS as LORA_UNET

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
# A second concept (the fusion benchmark's): its word comes after WORDS, so the diffusion benchmark's
# token ids and vocabulary (3 + len(WORDS)) are unchanged; models that know it have one more row.
SECOND_TRIGGER, SECOND_COLOUR = "blorf", (0.95, 0.5, 0.05)  # orange
ALL_WORDS = [*WORDS, SECOND_TRIGGER]
PAD, BOS, EOS = 0, 1, 2
SEQ = 6
SIZE = 16
UNET_TARGETS = [*LORA_UNET, "conv1", "conv2"]  # attention, feed-forward, proj_in / proj_out, resnet convs
TE_TARGETS = list(CLIP_TARGETS)


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
        words = [3 + ALL_WORDS.index(w) for w in prompt.split()]
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


def text_config(words: int = len(WORDS)) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=3 + words,
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
    def new(cls, seed: int, words: int = len(WORDS)) -> TinySD:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        torch.manual_seed(seed)
        return cls(UNet2DConditionModel(**unet_config()), CLIPTextModel(text_config(words)))

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


def concept_and_prior(
    gen: torch.Generator,
    n: int,
    trigger: str = TRIGGER,
    colour: tuple[float, float, float] = NEW_COLOUR[1],
) -> tuple[torch.Tensor, list[str]]:
    """Half the batch the new concept (``a zorp <shape>``, purple), half regular images (prior preservation)."""
    x_new, _, _, shapes = batch(gen, n // 2, {trigger: colour})
    x_old, prompts, _, _ = batch(gen, n - n // 2, COLOURS)
    return torch.cat([x_new, x_old]), [f"a {trigger} {SHAPES[s]}" for s in shapes] + prompts


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


def train_lora(
    base: Path,
    out: Path,
    recipe: Recipe,
    seed: int = 0,
    trigger: str = TRIGGER,
    colour: tuple[float, float, float] = NEW_COLOUR[1],
    fmt: str = "kohya",
) -> Path:
    """Train a concept LoRA (PEFT) on ``base`` and save it as a kohya (or diffusers) file with loraport's writer."""
    import functools

    from peft import LoraConfig, inject_adapter_in_model

    from loraport.adapters import LoraModule
    from loraport.diffusion import DiffusionBase
    from loraport.diffusion.formats import write_diffusers, write_kohya

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
    sampler = functools.partial(concept_and_prior, trigger=trigger, colour=colour)
    train(model, params, recipe.lora_steps, recipe.lora_lr, gen, sampler, batch_size=recipe.batch)
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
    meta = {"ss_network_module": "networks.lora", "ss_output_name": f"{trigger}-{base.name}"}
    if fmt == "diffusers":
        write_diffusers(out, modules, meta, {"ss_sd_model_name": base.name}, torch.float32)
        return out
    with DiffusionBase.open(base) as sd:
        write_kohya(out, modules, sd, "diffusers", meta, {"ss_sd_model_name": base.name}, torch.float32)
    return out


# -- using the models ------------------------------------------------------------------------


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


def train_classifier(steps: int, seed: int = 99) -> tuple[Classifier, float, float]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the weights' initialisation (library imports may have used the global generator)
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
