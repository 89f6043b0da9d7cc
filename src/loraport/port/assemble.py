"""Re-factorise the ported units into the target adapter's modules (balanced factors, PEFT scale)."""

from __future__ import annotations

import torch

from ..adapters import LoraModule, lora_scale
from ..errors import TransferError
from ..lowrank import balanced_factors
from .units import Part


def assemble_modules(results: list[Part]) -> dict[str, LoraModule]:
    """Group unit results by target module, stack fused parts, re-factorise with balanced factors.

    Plain modules keep rank <= r of their source; a fused target module built from parts
    gets rank <= sum of the parts' ranks (a q, k, v triple can need 3 r). The output alpha
    is the (first) source module's, the factors absorb any change of scale so that
    ``scale_out * B @ A`` equals the transferred update exactly. A conv target keeps its
    kernel (the factors stay flattened, ``A: (r, in * kh * kw)``).
    """
    groups: dict[str, list[Part]] = {}
    for item in results:
        groups.setdefault(item[0].target.module, []).append(item)
    modules: dict[str, LoraModule] = {}
    for name, items in groups.items():
        first = items[0][0]
        alpha = first.source_module.alpha
        scale_ref = first.source_module.scale
        m_t = first.target.out_rows
        n_t = first.target.shape[1]
        if len(items) == 1 and first.target.rows is None:
            unit, _, B, A = items[0]
            B = B * (unit.source_module.scale / scale_ref)
            max_rank = max(unit.source_module.rank, B.shape[1])  # calibrated may be asked for more
        else:
            blocks_B, blocks_A = [], []
            for unit, _, B_part, A_part in items:
                start, stop = unit.target.rows if unit.target.rows is not None else (0, m_t)
                block = B_part.new_zeros((m_t, B_part.shape[1]))
                block[start:stop] = B_part * (unit.source_module.scale / scale_ref)
                blocks_B.append(block)
                blocks_A.append(A_part)
            B, A = torch.cat(blocks_B, dim=1), torch.cat(blocks_A, dim=0)
            max_rank = sum(max(item[0].source_module.rank, item[2].shape[1]) for item in items)
        factors = balanced_factors(B.double(), A.double(), max_rank=max_rank)
        for item in items:
            item[1].rank = factors.rank
        if factors.rank == 0:
            for item in items:
                item[1].decision, item[1].reason = "skipped", "transferred update is zero"
            continue
        # PEFT scales by alpha / r_out: fold the ratio into the (balanced) factors.
        use_rslora = first.source_module.use_rslora
        ratio = scale_ref / lora_scale(alpha, factors.rank, use_rslora)
        root = ratio**0.5
        B_out = (factors.B * root).to("cpu", torch.float32)
        A_out = (factors.A * root).to("cpu", torch.float32)
        if B_out.shape[0] != m_t or A_out.shape[1] != n_t:
            raise TransferError(f"internal error: {name} factors {tuple(B_out.shape)} x {tuple(A_out.shape)}")
        modules[name] = LoraModule(name, A_out, B_out, alpha, use_rslora, kernel=first.target.kernel)
    return modules


__all__ = ["assemble_modules"]
