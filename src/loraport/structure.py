"""``loraport inspect``: a LoRA adapter as low-rank structure (seed 003).

For each module: rank, scale, ``||dW||_F``, the singular values of ``dW`` computed from the
factors (no dense SVD), the share of energy in the top 1 / 4 / 16 directions, the
effective rank, and the parameter count against a dense update. With a base model: how
much of ``dW`` lies in the base weight's top-k singular subspaces.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .adapters import LoraAdapter, load_adapter
from .architectures import architecture_for
from .checkpoints import Checkpoint, TensorSource
from .errors import AdapterError
from .lowrank import singular_values
from .subspace import SubspaceCache, chance_similarity, top_k_svd


@dataclass
class ModuleStructure:
    """Low-rank structure of one adapted module (``dW = scale * B @ A``).

    Attributes:
        energy_top: share of ``||dW||_F^2`` in the top 1, 4 and 16 singular directions.
        effective_rank: ``exp(entropy(S / sum S))`` (Roy & Vetterli), between 1 and r.
        params / dense_params: ``r (m + n)`` against ``m n``.
        in_base_subspace: ``||U_k U_k^T dW V_k V_k^T||_F / ||dW||_F`` for the base's top-k
            subspaces (``None`` without a base); ``left`` / ``right``: one-sided versions.
        chance: the value of ``in_base_subspace``'s square expected for a random update
            (``k/m * k/n``).
    """

    module: str
    shape: tuple[int, int]
    rank: int
    scale: float
    norm: float
    singular_values: list[float]
    energy_top: dict[str, float]
    effective_rank: float
    params: int
    dense_params: int
    k: int | None = None
    in_base_subspace: float | None = None
    in_base_left: float | None = None
    in_base_right: float | None = None
    chance: float | None = None


def module_structure(name: str, B: torch.Tensor, A: torch.Tensor, scale: float) -> ModuleStructure:
    """Structure of ``scale * B @ A`` from the factors alone."""
    S = singular_values(B.double(), A.double()) * abs(scale)
    energy = S**2
    total = float(energy.sum())
    top = {str(n): (float(energy[:n].sum()) / total if total > 0 else 0.0) for n in (1, 4, 16)}
    p = S / S.sum() if float(S.sum()) > 0 else S
    nz = p[p > 0]
    eff = math.exp(float(-(nz * nz.log()).sum())) if nz.numel() else 0.0
    m, n = int(B.shape[0]), int(A.shape[1])
    r = int(A.shape[0])
    return ModuleStructure(
        module=name,
        shape=(m, n),
        rank=r,
        scale=scale,
        norm=math.sqrt(total),
        singular_values=[float(s) for s in S],
        energy_top=top,
        effective_rank=eff,
        params=r * (m + n),
        dense_params=m * n,
    )


def inspect_adapter(
    adapter: str | os.PathLike[str] | LoraAdapter,
    base: str | os.PathLike[str] | None = None,
    subspace_rank: int = 64,
    svd: str = "randomized",
    cache_dir: str | None = None,
) -> list[ModuleStructure]:
    """Structure of every module of ``adapter``; with ``base``, its share in the base subspaces.

    ``adapter`` may be a PEFT directory or a GGUF LoRA file (a llama one written by llama.cpp's
    converter needs ``base`` for its head counts); also an image-model LoRA (kohya or diffusers file, per-component PEFT
    directories); with ``base`` (a Stable Diffusion folder or single file) its kohya names
    are resolved, conv modules measured in their flattened ``(out, in * kh * kw)`` form.
    """
    adapter, weight_of = _adapter_and_base(adapter, base)
    cache = SubspaceCache(cache_dir)
    rows: list[ModuleStructure] = []
    for module in adapter.modules.values():
        B, A = module.B.double(), module.A.double()
        info = module_structure(module.name, B, A, module.scale)
        if weight_of is not None:
            source, key, transposed = weight_of(module.name)
            k = min(subspace_rank, *module.shape)
            cache_key = SubspaceCache.key(source.fingerprint(key), None, k, svd, 8, 2, 0)
            sub = cache.get(cache_key)
            if sub is None:
                W = source.get(key).float()
                W = W.mT if transposed else W.flatten(1)
                if tuple(W.shape) != module.shape:
                    raise AdapterError(
                        f"adapter module {module.name} has shape {module.shape} but {key} is {tuple(W.shape)}"
                    )
                sub = top_k_svd(W, k, svd)
                cache.put(cache_key, sub)
            U, V = sub.U.double(), sub.V.double()
            total = info.norm / abs(module.scale) if module.scale else 0.0
            if total > 0:
                UB, AV = U.mT @ B, A @ V
                info.in_base_subspace = float(torch.linalg.matrix_norm(UB @ AV)) / total
                info.in_base_left = _gram_norm(UB, A) / total
                info.in_base_right = _gram_norm(B, AV) / total
            info.k = k
            info.chance = math.sqrt(chance_similarity(k, module.shape[0]) * chance_similarity(k, module.shape[1]))
        rows.append(info)
    return rows


WeightLookup = Callable[[str], tuple[TensorSource, str, bool]]


def _adapter_and_base(
    adapter: str | os.PathLike[str] | LoraAdapter, base: str | os.PathLike[str] | None
) -> tuple[LoraAdapter, WeightLookup | None]:
    """The adapter, and (with a base) where each of its modules' base weight is: (source, key, transposed)."""
    if not isinstance(adapter, LoraAdapter):
        from .diffusion.formats import detect_format

        if detect_format(adapter) is not None:
            from .diffusion import DiffusionBase, read_diffusion_lora

            sd = DiffusionBase.open(base) if base is not None else None
            lora = read_diffusion_lora(adapter, sd, drop_unsupported=True).adapter
            if sd is None:
                return lora, None

            def diffusion_weight(name: str) -> tuple[TensorSource, str, bool]:
                component, _, module = name.partition(".")
                return sd.components[component], f"{module}.weight", False

            return lora, diffusion_weight
    ckpt = Checkpoint.open(base) if base is not None else None
    if not isinstance(adapter, LoraAdapter):
        adapter = load_adapter(adapter, drop_unsupported=True, base=ckpt)
    if ckpt is None:
        return adapter, None
    shapes = None if ckpt.model_type else {k: ckpt.shape(k) for k in ckpt.keys()}
    arch = architecture_for(ckpt.config, shapes)

    def weight(name: str) -> tuple[TensorSource, str, bool]:
        key = ckpt.resolve_module(name)
        if key is None:
            raise AdapterError(f"adapter module {name} has no weight in {ckpt.name}")
        return ckpt, key, arch.transposed

    return adapter, weight


def _gram_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    return float(torch.sqrt(torch.clamp(torch.sum((B.mT @ B) * (A @ A.mT)), min=0)))


def format_structure(rows: list[ModuleStructure]) -> str:
    """A plain-text table of :func:`inspect_adapter` output."""
    with_base = any(r.in_base_subspace is not None for r in rows)
    header = (
        f"{'module':<52} {'shape':>12} {'r':>3} {'scale':>6} {'||dW||':>9} {'top1':>5} {'top4':>5} "
        f"{'top16':>5} {'effr':>5} {'params':>8}"
    )
    if with_base:
        header += f" {'k':>4} {'in-sub':>6} {'left':>5} {'right':>5} {'chance':>6}"
    lines = [header]
    for r in rows:
        line = (
            f"{r.module[-52:]:<52} {f'{r.shape[0]}x{r.shape[1]}':>12} {r.rank:>3} {r.scale:>6.3g} "
            f"{r.norm:>9.4g} {r.energy_top['1']:>5.2f} {r.energy_top['4']:>5.2f} {r.energy_top['16']:>5.2f} "
            f"{r.effective_rank:>5.1f} {r.params / r.dense_params:>7.1%}"
        )
        if with_base and r.in_base_subspace is not None:
            line += (
                f" {r.k:>4} {r.in_base_subspace:>6.3f} {r.in_base_left:>5.2f} {r.in_base_right:>5.2f} {r.chance:>6.3f}"
            )
        lines.append(line)
    if rows:
        mean = sum(r.effective_rank for r in rows) / len(rows)
        lines.append(
            f"{len(rows)} module(s); mean effective rank {mean:.2f}; "
            f"parameters {sum(r.params for r in rows):,} vs dense {sum(r.dense_params for r in rows):,}"
        )
        if with_base:
            vals = [r.in_base_subspace for r in rows if r.in_base_subspace is not None]
            lines.append(
                f"mean share of ||dW|| inside the base's top-k subspaces: {sum(vals) / len(vals):.3f} "
                f"(random update: ~{sum(r.chance or 0 for r in rows) / len(rows):.3f})"
            )
    return "\n".join(lines)


def structure_to_dicts(rows: list[ModuleStructure]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
