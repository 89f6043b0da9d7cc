"""Input Gram matrices of every linear module, streamed from calibration text through ``N`` models (RegMean).

:class:`LayerGrams` runs the same unlabeled text through each model one decoder layer at a
time (:mod:`loraport.streaming`: weights read lazily, GPTQ style), and for each linear module
of a decoder layer accumulates ``G_i = X_i X_i^T`` over the real tokens of model ``i``'s own
inputs, in float64 (:func:`~loraport.calibrate.accumulate.add_product`). Modules fed by one tensor (q, k,
v; gate, up) share one Gram. Layers are served in increasing order; only the current layer's
Grams are kept.

A model is a checkpoint, or a base checkpoint plus an adapter's updates (``extras``): the base
with the adapter merged, without writing it.

Memory: per model, the calibration batch's hidden states (``tokens x hidden`` float32) and
one decoder layer; the current layer's Grams, ``N x sum_inputs n^2`` float64 (for a
Qwen2.5-1.5B-shaped layer and ``N = 2``: about 1.4 GB, dominated by ``down_proj``'s
``8960 x 8960``). Time: one forward pass of each model over the calibration tokens plus the
Gram products (``tokens x n^2`` per distinct input).

Example::

    >>> grams = LayerGrams([ckpt_a, ckpt_b], arch, calibration_options)   # doctest: +SKIP
    >>> G_a, G_b = grams.get(0, "self_attn.q_proj")                        # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..architectures import Architecture
from ..calibrate.accumulate import add_product
from ..calibrate.shared import STAGES
from ..calibrate.text import read_calibration_lines, shared_tokenizer, tokenize_calibration
from ..checkpoints import Checkpoint
from ..streaming import Stream, StreamedModel, make_chunks
from .options import FusionError, RegMeanOptions

LayerExtras = Callable[[int], dict[str, torch.Tensor]]


class LayerGrams:
    """Per-layer input Grams of the decoder layers' linear modules, for ``N`` models side by side.

    Args:
        checkpoints: one per model (the same base checkpoint repeated for adapters).
        arch: their architecture (which modules are linear layers of a decoder layer).
        settings: calibration text and batch settings (:class:`~loraport.fusion.options.RegMeanOptions`).
        extras: per model, ``layer -> {parameter name: addition}`` (an adapter's updates), or ``None``.
        progress: a progress bar over layers on stderr.
    """

    def __init__(
        self,
        checkpoints: Sequence[Checkpoint],
        arch: Architecture,
        settings: RegMeanOptions,
        extras: Sequence[LayerExtras | None] | None = None,
        progress: bool = False,
    ) -> None:
        started = time.perf_counter()
        self.arch = arch
        self.extras = list(extras) if extras is not None else [None] * len(checkpoints)
        distinct = list({id(c): c for c in checkpoints}.values())
        tokenizer = shared_tokenizer(distinct[0], distinct[0], "regmean")  # loads it, with a clear error
        for other in distinct[1:]:
            tokenizer = shared_tokenizer(distinct[0], other, "regmean")
        texts = settings.model_calibration or [settings.calibration] * len(checkpoints)
        if len(texts) != len(checkpoints):
            raise FusionError(f"{len(texts)} calibration texts for {len(checkpoints)} models (give one per model)")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = torch.device(settings.device)
        self.streams, sources, self.samples, self.tokens = [], [], 0, 0
        for ckpt, text in zip(checkpoints, texts, strict=True):
            samples, name = read_calibration_lines(text)  # type: ignore[arg-type]
            ids = tokenize_calibration(samples, tokenizer, settings.samples, settings.max_tokens, name)
            chunks = make_chunks(ids, pad, settings.batch_size)
            self.streams.append(Stream(StreamedModel(ckpt, arch, settings.device), chunks))
            sources.append(name)
            self.samples += len(ids)
            self.tokens += sum(c.tokens for c in chunks)
        self.source = sources[0] if len(set(sources)) == 1 else ", ".join(sources)
        self.layers = len(self.streams[0].model.layers)
        self.layer = -1
        self._grams: dict[str, list[torch.Tensor]] = {}
        self._bar = tqdm(
            total=self.layers, desc="loraport regmean grams", unit="layer", file=sys.stderr, disable=not progress
        )
        self.seconds = time.perf_counter() - started

    def module_of(self, tensor_name: str) -> tuple[int, str] | None:
        """``(layer, suffix)`` when ``tensor_name`` is the weight of a decoder layer's linear module."""
        if not tensor_name.endswith(".weight"):
            return None
        parsed = self.arch.parse(tensor_name.removesuffix(".weight"))
        return None if parsed is None else (parsed[0], parsed[1].suffix)

    def get(self, layer: int, suffix: str) -> list[torch.Tensor]:
        """The ``N`` Grams ``(n, n)`` (float64) of module ``suffix`` of ``layer``; layers in increasing order."""
        if layer < self.layer:
            raise FusionError(f"Gram matrices of layer {layer} were requested after layer {self.layer}")
        while self.layer < layer:
            self._advance()
        if suffix not in self._grams:
            raise FusionError(f"layer {layer}: the model never ran its module {suffix}")
        return self._grams[suffix]

    def _advance(self) -> None:
        started = time.perf_counter()
        index = self.layer + 1
        if index >= self.layers:
            raise FusionError(f"no decoder layer {index} (the model has {self.layers})")
        self._grams = {}
        for i, stream in enumerate(self.streams):
            extra = self.extras[i]
            layer = stream.model.load_layer(index, extra(index) if extra is not None else None)
            for suffix, gram in self._layer_grams(stream, layer).items():
                self._grams.setdefault(suffix, []).append(gram)
            stream.model.release_layer(index)
        self.layer = index
        self._bar.update(1)
        if self.layer == self.layers - 1:
            self._bar.close()
        self.seconds += time.perf_counter() - started

    def _layer_grams(self, stream: Stream, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Run ``layer`` on every chunk of ``stream`` (advancing it) and return each linear module's input Gram."""
        grams: dict[str, torch.Tensor] = {}
        shared: dict[tuple[int, int, tuple[int, ...]], str] = {}  # (stage, input tensor) -> first module
        aliases: dict[str, str] = {}
        seen_chunk = [-1]

        def hook(args: tuple[Any, ...], suffix: str, stage: int) -> None:
            if stream.current != seen_chunk[0]:
                shared.clear()
                seen_chunk[0] = stream.current
            x_full = args[0]
            # q/k/v (and gate/up) read one tensor: one Gram. Only modules of one stage can share,
            # so a freed input whose memory is reused later in the layer is never mistaken for it.
            key = (stage, x_full.data_ptr(), tuple(x_full.shape))
            first = shared.setdefault(key, suffix)
            if first != suffix:
                aliases[suffix] = first
                return
            x = stream.chunks[stream.current].flat(x_full).float()
            if suffix not in grams:
                grams[suffix] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=self.device)
            add_product(grams[suffix], x, x)

        handles = []
        for position, (suffix, spec) in enumerate(self.arch.modules.items()):
            if not _has(layer, suffix):
                continue
            stage = STAGES.get(spec.roles[0], len(STAGES) + position)
            module = layer.get_submodule(suffix)
            handles.append(module.register_forward_pre_hook(lambda m, a, s=suffix, g=stage: hook(a, s, g)))
        try:
            stream.advance(layer)
        finally:
            for handle in handles:
                handle.remove()
        for suffix, first in aliases.items():
            grams[suffix] = grams[first]
        return grams

    def close(self) -> None:
        self._bar.close()


def _has(layer: torch.nn.Module, suffix: str) -> bool:
    try:
        layer.get_submodule(suffix)
    except AttributeError:
        return False
    return True


__all__ = ["LayerExtras", "LayerGrams"]
