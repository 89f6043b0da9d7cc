"""Run a causal LM one decoder layer at a time, with weights read lazily from its checkpoint.

:class:`StreamedModel` builds the ``transformers`` model from its config with every
parameter on the ``meta`` device (buffers, such as rotary ``inv_freq``, are created for real),
loads the weights outside the decoder layers, and materialises one decoder layer at a time
from the :class:`~loraport.checkpoints.Checkpoint` reader. :class:`Stream` holds the hidden
states of a batch of token sequences at the current layer and advances them layer by layer
(GPTQ style).

Position embeddings and attention masks are not re-implemented: one run of the model's own
forward pass, with every decoder layer replaced by a recorder, captures the arguments each
layer is called with (per layer, so Gemma-2's sliding and global masks are both right).

Example::

    >>> model = StreamedModel(Checkpoint.open("runs/base"), arch, "cpu")        # doctest: +SKIP
    >>> stream = Stream(model, make_chunks([[1, 5, 7], [1, 9]], pad_id=0))      # doctest: +SKIP
    >>> layer = model.load_layer(0); stream.advance(stream.run(layer, 0))       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import Architecture
from .checkpoints import Checkpoint
from .checkpoints.meta import parameters_on_meta
from .errors import LoraportError


class Stop(Exception):
    """Raised from a hook to end a forward pass once the needed activations were seen."""


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer during the preamble run: records its inputs, passes through."""

    def __init__(self, index: int, calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]], last: bool) -> None:
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls[self.index] = ((hidden_states, *args), kwargs)
        if self.last:
            raise Stop
        return hidden_states


def resolve_key(ckpt: Checkpoint, name: str) -> str | None:
    """The checkpoint's name for a model parameter, tolerating prefix differences."""
    if name in ckpt:
        return name
    parts = name.split(".")
    for start in range(1, len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in ckpt:
            return candidate
    matches = [k for k in ckpt.keys() if k.endswith("." + name)]
    return matches[0] if len(matches) == 1 else None


class StreamedModel:
    """A causal LM whose decoder layers are read from a checkpoint one at a time.

    Args:
        ckpt: the model directory's lazy reader (``config.json`` beside the weights).
        arch: its architecture (the layer prefix locates the decoder layers).
        device: where layers run.
        dtype: compute dtype of the materialised weights (float32 default).
    """

    def __init__(self, ckpt: Checkpoint, arch: Architecture, device: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        self.ckpt, self.arch, self.device, self.dtype = ckpt, arch, torch.device(device), dtype
        config = ckpt.transformers_config()
        config.use_cache = False
        with parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.config = config
        container = arch.layer_prefix.split(".${layer}")[0]
        self.layers, self.layers_path = self._find_layers(container)
        self._load_outer()
        dtype = self.dtype
        self.model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.to(dtype))
        for module in self.model.modules():  # buffers (rotary inv_freq) were created for real
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(self.device)

    def _find_layers(self, container: str) -> tuple[torch.nn.ModuleList, str]:
        leaf = container.rsplit(".", 1)[-1]
        candidates = [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and (name == container or name.rsplit(".", 1)[-1] == leaf)
        ]
        if not candidates:
            raise LoraportError(f"{self.ckpt.name}: cannot find the decoder layers ({container}) in the model class")
        name, module = max(candidates, key=lambda item: len(item[1]))
        return module, name

    def _set(
        self, owner: torch.nn.Module, leaf: str, key: str, extra: torch.Tensor | None = None, cast: bool = True
    ) -> None:
        tensor = self.ckpt.get(key).to(self.device, self.dtype if cast else None)
        expected = tuple(owner._parameters[leaf].shape)
        if tuple(tensor.shape) != expected:
            raise LoraportError(f"{self.ckpt.file_of(key)}: {key} has shape {tuple(tensor.shape)}, expected {expected}")
        if extra is not None:
            tensor = tensor + extra.to(tensor)
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)

    def _load_outer(self) -> None:
        """Every weight outside the decoder layers except the output head and the input embeddings.

        The input embeddings are read later, only the rows of the tokens the calibration text
        uses (:meth:`load_embedding_rows`): a 256k x 2304 table is 1.2 GB in bfloat16 and
        2.4 GB in float32, of which a few thousand rows are needed.
        """
        head = self.model.get_output_embeddings()
        embedding = self.model.get_input_embeddings()
        embed_ids = {id(p) for p in embedding.parameters()}
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        prefix = self.layers_path + "."
        self._embedding_key: str | None = None
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):
            if name.startswith(prefix) or (id(param) in head_ids and id(param) not in embed_ids):
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            if owner._parameters[leaf].device.type != "meta":
                continue
            key = resolve_key(self.ckpt, name)
            if key is None:
                if id(param) in embed_ids:
                    raise LoraportError(f"{self.ckpt.name}: no tensor for {name} (the input embeddings)")
                continue  # e.g. the final norm: never run here
            if id(param) in embed_ids:
                self._embedding_key = key
                continue
            self._set(owner, leaf, key)

    def load_embedding_rows(self, token_ids: torch.Tensor) -> None:
        """Give the input embeddings only the rows of ``token_ids`` (sorted, unique), in their stored dtype.

        The preamble must then be called with ids remapped to positions in ``token_ids``
        (:meth:`Stream.__init__` does). A lookup is exact; a hook casts its output.
        """
        embedding = self.model.get_input_embeddings()
        if self._embedding_key is None:
            raise LoraportError(f"{self.ckpt.name}: no input embeddings to read")
        rows = self.ckpt.get_rows(self._embedding_key, token_ids).to(self.device)
        embedding._parameters["weight"] = torch.nn.Parameter(rows, requires_grad=False)
        if getattr(embedding, "padding_idx", None) is not None:
            embedding.padding_idx = None  # an index into the full table; lookups only here

    def release_outer(self) -> None:
        """Free the weights outside the decoder layers (the preamble has run)."""
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(self.layers_path + ".") and param.device.type != "meta":
                owner_name, _, leaf = name.rpartition(".")
                owner = self.model.get_submodule(owner_name)
                owner._parameters[leaf] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    def preamble(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """Run the model's forward up to its decoder layers.

        Returns:
            The first layer's input ``(b, L, hidden)`` and, per layer, the other
            ``(args, kwargs)`` it is called with (position embeddings, mask, ...).
        """
        calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        real = list(self.layers)
        for i in range(len(real)):
            self.layers[i] = _Recorder(i, calls, last=i == len(real) - 1)
        try:
            with torch.no_grad(), contextlib.suppress(Stop):
                self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer
        if len(calls) != len(real):
            raise LoraportError(f"{self.ckpt.name}: the model ran {len(calls)} of {len(real)} decoder layers")
        return calls[0][0][0], [(calls[i][0][1:], calls[i][1]) for i in range(len(real))]

    def load_layer(self, index: int, extra: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """Materialise decoder layer ``index``; ``extra`` maps parameter names (in the layer) to additions."""
        layer = self.layers[index]
        prefix = f"{self.layers_path}.{index}"
        for name, _ in list(layer.named_parameters()):
            full = f"{prefix}.{name}"
            key = resolve_key(self.ckpt, full)
            if key is None:
                raise LoraportError(f"{self.ckpt.name}: no tensor for {full} (needed to run the model)")
            owner_name, _, leaf = name.rpartition(".")
            self._set(layer.get_submodule(owner_name) if owner_name else layer, leaf, key, (extra or {}).get(name))
        return layer

    def release_layer(self, index: int) -> None:
        """Send layer ``index``'s weights back to ``meta`` (frees them)."""
        for sub in self.layers[index].modules():
            for leaf, param in list(sub._parameters.items()):
                if param is not None:
                    sub._parameters[leaf] = torch.nn.Parameter(param.to("meta"), requires_grad=False)


def layer_output(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states (older ``transformers`` return a tuple)."""
    return output[0] if isinstance(output, tuple | list) else output


@dataclass
class Chunk:
    """A right-padded batch of token sequences (``fold``: for held-out estimates)."""

    ids: torch.Tensor  # (b, L)
    mask: torch.Tensor  # (b, L), 1 = real token
    fold: int = 0
    valid: torch.Tensor = field(init=False)  # flat indices of the real tokens

    def __post_init__(self) -> None:
        self.valid = torch.nonzero(self.mask.reshape(-1), as_tuple=True)[0]

    @classmethod
    def padded(cls, rows: list[list[int]], pad_id: int, fold: int = 0) -> Chunk:
        """Token id rows right-padded with ``pad_id`` into one batch."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[j, : len(row)] = 1
        return cls(ids, mask, fold)

    @property
    def tokens(self) -> int:
        return int(self.valid.numel())

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """Real-token rows of a ``(b, L, n)`` activation: ``(T, n)``."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.valid.to(x.device))


def make_chunks(ids: list[list[int]], pad_id: int, batch_size: int = 16, folds: int = 1) -> list[Chunk]:
    """Fold-homogeneous, right-padded batches (sample ``i`` is in fold ``i % folds``), sorted by length."""
    chunks: list[Chunk] = []
    for fold in range(folds):
        members = sorted((row for i, row in enumerate(ids) if i % folds == fold), key=len)
        for start in range(0, len(members), batch_size):
            chunks.append(Chunk.padded(members[start : start + batch_size], pad_id, fold))
    return chunks


class Stream:
    """The hidden states of ``chunks`` in one model at layer ``index``, advanced one layer at a time."""

    def __init__(self, model: StreamedModel, chunks: list[Chunk]) -> None:
        self.model, self.chunks = model, chunks
        self.states: list[torch.Tensor] = []
        self.layer_args: list[list[Any]] = []  # per chunk, per layer: (args, kwargs)
        used = torch.unique(torch.cat([chunk.ids.reshape(-1) for chunk in chunks]))
        model.load_embedding_rows(used)
        for chunk in chunks:
            hidden, per_layer = model.preamble(torch.searchsorted(used, chunk.ids), chunk.mask)
            self.states.append(hidden)
            self.layer_args.append(per_layer)
        model.release_outer()
        self.index = 0
        self.current = 0  # the chunk being run (read by hooks)

    def run_chunk(self, layer: torch.nn.Module, index: int, c: int) -> torch.Tensor | None:
        """Run ``layer`` (decoder layer ``index``) on chunk ``c``; ``None`` if a hook raised :class:`Stop`."""
        args, kwargs = self.layer_args[c][index]
        self.current = c
        with torch.no_grad():
            try:
                return layer_output(layer(self.states[c], *args, **kwargs))
            except Stop:
                return None

    def advance(self, layer: torch.nn.Module) -> None:
        """Run ``layer`` (this stream's layer ``index``) on every chunk and move to the next layer."""
        outputs = [self.run_chunk(layer, self.index, c) for c in range(len(self.chunks))]
        if any(o is None for o in outputs):
            raise RuntimeError("a hook stopped a full layer pass")
        self.states = [o for o in outputs if o is not None]
        self.index += 1


__all__ = ["Chunk", "Stop", "Stream", "StreamedModel", "layer_output", "make_chunks", "parameters_on_meta"]
