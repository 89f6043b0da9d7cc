"""Subspaces of base weights for one port: memory, then the disk cache, then read + decompose."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .checkpoints import TensorSource
from .errors import CheckpointError
from .subspace import Subspace, SubspaceCache, matrix_norms, top_k_svd

# (where the weight is, stored transposed, tensor name, rows, k)
Request = tuple[TensorSource, bool, str, tuple[int, int] | None, int]


class SubspaceStore:
    """Subspaces of base weights: memory, then disk cache, then read + decompose.

    Reads run on one background thread, ``prefetch`` requests ahead of the consumer, so
    reading the next weight overlaps decomposing the current one.
    """

    def __init__(
        self,
        cache: SubspaceCache | None,
        svd: str = "randomized",
        oversample: int = 8,
        niter: int = 2,
        seed: int = 0,
        device: str = "cpu",
        prefetch: int = 2,
    ) -> None:
        self.cache = cache
        self.svd, self.oversample, self.niter, self.seed, self.device = svd, oversample, niter, seed, device
        self.memory: dict[str, Subspace] = {}
        self.prefetch = prefetch
        self._plan: list[Request] = []
        self._position: dict[str, int] = {}
        self._uses: dict[str, int] = {}
        self._pending: dict[str, Future[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraport-read")
        self.computed = 0

    def _key(self, ckpt: TensorSource, key: str, rows: tuple[int, int] | None, k: int) -> str:
        return SubspaceCache.key(ckpt.fingerprint(key), rows, k, self.svd, self.oversample, self.niter, self.seed)

    def plan(self, requests: list[Request]) -> None:
        """Declare the order in which subspaces will be asked for (enables prefetching)."""
        self._plan = []
        for request in requests:
            cache_key = self._key(request[0], request[2], request[3], request[4])
            self._uses[cache_key] = self._uses.get(cache_key, 0) + 1
            if cache_key in self._position:
                continue
            self._position[cache_key] = len(self._plan)
            self._plan.append(request)

    def _read(
        self, ckpt: TensorSource, transposed: bool, key: str, rows: tuple[int, int] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Read one weight as float32 ``(out, in)`` with its row/column norms (checked finite).

        A conv weight ``(out, in, kh, kw)`` is read as ``(out, in * kh * kw)`` (SPEC sec. 11).
        """
        if transposed:
            W = ckpt.get(key).to(self.device, torch.float32).mT
            W = (W if rows is None else W[rows[0] : rows[1]]).contiguous()
        else:
            W = ckpt.get(key, rows).to(self.device, torch.float32)
            if W.ndim > 2:
                W = W.flatten(1)
        norms = matrix_norms(W)
        # A NaN or Inf anywhere makes its row norm non-finite: no extra pass over W needed.
        if not bool(torch.isfinite(norms[0]).all()):
            raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key} contains NaN or Inf")
        return W, norms

    def _schedule_from(self, index: int) -> None:
        for request in self._plan[index : index + self.prefetch + 1]:
            ckpt, transposed, key, rows, k = request
            cache_key = self._key(ckpt, key, rows, k)
            if cache_key in self.memory or cache_key in self._pending:
                continue
            if self.cache is not None and self.cache._path(cache_key).exists():
                continue
            self._pending[cache_key] = self._pool.submit(self._read, ckpt, transposed, key, rows)

    def get(self, ckpt: TensorSource, transposed: bool, key: str, rows: tuple[int, int] | None, k: int) -> Subspace:
        """The subspace of one weight (or row block); kept in memory only while the plan still needs it."""
        cache_key = self._key(ckpt, key, rows, k)
        entry = self.memory.get(cache_key)
        if entry is None:
            if cache_key in self._position:
                self._schedule_from(self._position[cache_key])
            entry = self.cache.get(cache_key) if self.cache is not None else None
            if entry is None:
                pending = self._pending.pop(cache_key, None)
                W, norms = pending.result() if pending is not None else self._read(ckpt, transposed, key, rows)
                entry = top_k_svd(
                    W, k, self.svd, oversample=self.oversample, niter=self.niter, seed=self.seed, norms=norms
                )
                del W
                self.computed += 1
                if self.cache is not None:
                    self.cache.put(cache_key, entry)
            entry = entry.to(self.device)
        remaining = self._uses.get(cache_key, 1) - 1
        self._uses[cache_key] = remaining
        if remaining > 0:
            self.memory[cache_key] = entry
        else:
            self.memory.pop(cache_key, None)
        return entry

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
