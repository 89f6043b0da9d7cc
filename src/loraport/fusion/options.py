"""Options of :func:`loraport.fusion.fuse` and :func:`loraport.fusion.fuse_adapters`, grouped by concern.

:class:`FuseOptions` holds what every method shares (the method, the task-vector ``scaling``,
which tensors go through the method, the output) and one group per method with settings of
its own: :class:`RgspOptions`, :class:`TiesOptions`, :class:`DareOptions`,
:class:`IsoCtsOptions`, :class:`RegMeanOptions`.

Keyword overrides of :func:`~loraport.fusion.fuse` may name a group's field directly
(``density=0.5``): it goes to the chosen method's group if that has the field, else to every
group that has it (:func:`resolve_options`).

Example::

    >>> options = resolve_options(None, {"method": "ties", "density": 0.5})
    >>> options.ties.density, options.to_dict()["density"]
    (0.5, 0.5)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import LoraportError
from . import baselines
from .registry import FUSION_METHODS
from .regmean import DEFAULT_RIDGE, DEFAULT_SHRINKAGE
from .rgsp import (
    DEFAULT_BETA,
    DEFAULT_EPSILON,
    DEFAULT_GAMMA,
    DEFAULT_GW_MAX_ITER,
    DEFAULT_RANK,
    DEFAULT_TFI_EPS,
)
from .subspace_merge import DEFAULT_COMMON_FRACTION

# Embedding and output-head matrices are (vocab x hidden) lookups: their SVD is costly and
# their rows are per-token, so by default they are averaged rather than fused.
DEFAULT_EXCLUDE = r"embed|lm_head|\bwte\b|\bwpe\b"
DEFAULT_SHARD_SIZE = 2 * 2**30
DEFAULT_DARE_DENSITY = 0.5
FALLBACKS = ("average", "task_arithmetic")
DARE_COMBINE = ("task_arithmetic", "ties")
AUTO = "auto"
# The defaults (method, scaling) when none is given, per input kind: chosen by the real fusion
# benchmark (benchmarks/results/fusion_real.md; docs/fusion.md says why).
DEFAULTS: dict[str, tuple[str, float]] = {
    # SmolLM2 LoRAs: the best data-free method on the content merges; its dev-chosen scaling in 4 of those 5
    "adapter": ("iso_c", 1.5),
    "image": ("tsv", 0.5),  # two concept LoRAs of the tiny text-to-image world: the best method, its dev scaling
    # two SmolLM2 full fine-tunes: the best worst-domain gain kept (RegMean, which needs text, tied); its dev scaling
    "model": ("tsv", 1.0),
}


class FusionError(LoraportError):
    """The fusion cannot proceed: mismatched models, bad options, non-finite results."""


def check_calibration_count(texts: int, models: int) -> None:
    """regmean: one calibration text for every model, or one per model."""
    _check(texts in (1, models), f"{texts} calibration texts for {models} models (give one per model)")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise FusionError(message)


@dataclass
class RgspOptions:
    """RGSP-TEFM (seed 004, SPEC sec. 7).

    Attributes:
        rank: top-r SVD rank (clamped to ``min(m, n)``).
        epsilon: entropic regularisation of the GW solver (costs are normalised to ``[0, 1]``).
            0.05 met the 0.1% marginal criterion on every case we tried (``r`` from 1 to 64),
            mostly in well under a second, with a plan far from uniform (``max r pi`` about 0.2
            at ``r = 64``); POT's default 0.1 is nearly uniform at ``r = 64``; 0.01 is sharper
            but stalls Sinkhorn for small ``r``. A failed solve is retried with epsilon doubled.
        beta, gamma, tfi_eps: RGSP constants (see :mod:`loraport.fusion.rgsp`). ``gamma = 1``
            (the seed's) puts the result near ``1.5 W_B - 0.5 W_A``, past B.
        svd: ``"exact"`` (default: RGSP works on small singular-value differences, which a
            randomized SVD blurs) or ``"randomized"`` (seeded, for large matrices).
        seed, gw_max_iter: randomized-SVD seed; GW solver iterations.
    """

    rank: int = DEFAULT_RANK
    epsilon: float = DEFAULT_EPSILON
    beta: float = DEFAULT_BETA
    gamma: float = DEFAULT_GAMMA
    tfi_eps: float = DEFAULT_TFI_EPS
    svd: str = "exact"
    seed: int = 0
    gw_max_iter: int = DEFAULT_GW_MAX_ITER

    def validate(self) -> None:
        _check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        _check(self.epsilon > 0, f"epsilon must be > 0, got {self.epsilon}")
        _check(self.svd in ("exact", "randomized"), f"svd must be 'exact' or 'randomized', got {self.svd!r}")
        _check(self.tfi_eps > 0, f"tfi_eps must be > 0, got {self.tfi_eps}")


@dataclass
class TiesOptions:
    """TIES: ``density`` = fraction of each task vector's entries kept by magnitude (paper: 0.2)."""

    density: float = baselines.DEFAULT_DENSITY

    def validate(self) -> None:
        _check(0 < self.density <= 1, f"density must be in (0, 1], got {self.density}")


@dataclass
class DareOptions:
    """DARE: keep each entry with probability ``density`` (rescaled by ``1/density``), then ``combine``.

    Attributes:
        density: keep probability (``1 - p`` in the paper's drop rate ``p``).
        combine: ``"task_arithmetic"`` (sum, mergekit's ``dare_linear``) or ``"ties"`` (sign
            election and disjoint mean, ``dare_ties``).
        seed: the masks' seed; each tensor's mask comes from ``seed`` and its name, so a run
            is reproducible and independent of the tensor order.
    """

    density: float = DEFAULT_DARE_DENSITY
    combine: str = "task_arithmetic"
    seed: int = 0

    def validate(self) -> None:
        _check(0 < self.density <= 1, f"density must be in (0, 1], got {self.density}")
        _check(self.combine in DARE_COMBINE, f"dare combine must be one of {', '.join(DARE_COMBINE)}")


@dataclass
class IsoCtsOptions:
    """Iso-CTS: ``common_fraction`` of ``d = min(m, n)`` kept as the common subspace (paper: 0.8)."""

    common_fraction: float = DEFAULT_COMMON_FRACTION

    def validate(self) -> None:
        _check(0 <= self.common_fraction <= 1, f"common_fraction must be in [0, 1], got {self.common_fraction}")


@dataclass
class RegMeanOptions:
    """RegMean: input Gram matrices from unlabeled text run through each model.

    Attributes:
        calibration: a UTF-8 text file (one sample a line) or a list of strings, run through
            every model; or ``model_calibration``: one file (or list of strings) per input
            model, in order, each run through its own model (the RegMean paper's setting: each
            model's Gram from unlabeled inputs of its own task). One of the two is required.
        samples, max_tokens, batch_size: how much of it is used (per model) and in what batches.
        shrinkage: ``a``, the factor on off-diagonal Gram entries (paper and SPEC: 0.9).
        ridge: relative ridge toward the average (keeps dead inputs solvable; 0 = exact formula).
        fallback: what tensors other than the decoder layers' linear weights get (embeddings,
            norms, the output head): ``"average"`` (the paper's choice) or ``"task_arithmetic"``
            (needs the base, uses ``scaling``).
        device: where the models run (``"cpu"``, ``"cuda"``).
    """

    calibration: str | os.PathLike[str] | Sequence[str] | None = None
    model_calibration: Sequence[str | os.PathLike[str] | Sequence[str]] | None = None
    samples: int = 256
    max_tokens: int = 128
    batch_size: int = 16
    shrinkage: float = DEFAULT_SHRINKAGE
    ridge: float = DEFAULT_RIDGE
    fallback: str = "average"
    device: str = "cpu"

    def validate(self) -> None:
        _check(
            (self.calibration is None) != (self.model_calibration is None),
            "regmean needs calibration text (--calibration FILE: unlabeled text, one sample per line; or one "
            "file per model)",
        )
        _check(0 <= self.shrinkage <= 1, f"shrinkage must be in [0, 1], got {self.shrinkage}")
        _check(self.ridge >= 0, f"ridge must be >= 0, got {self.ridge}")
        _check(self.fallback in FALLBACKS, f"regmean fallback must be one of {', '.join(FALLBACKS)}")
        _check(
            min(self.samples, self.max_tokens, self.batch_size) >= 1,
            "calibration samples, max tokens and batch size must be >= 1",
        )


# Method name -> the name of its options group in FuseOptions.
METHOD_GROUPS = {"rgsp": "rgsp", "ties": "ties", "dare": "dare", "iso_cts": "iso_cts", "regmean": "regmean"}


@dataclass
class FuseOptions:
    """Options of :func:`loraport.fusion.fuse` and :func:`loraport.fusion.fuse_adapters`.

    Attributes:
        method: one of :data:`~loraport.fusion.methods.FUSION_METHODS`, or ``"auto"`` (the
            default): :data:`DEFAULTS` for the inputs' kind (adapters, models), with its scaling
            unless ``scaling`` is given.
        scaling: task-vector methods (``task_arithmetic``, ``ties``, ``dare``, ``tsv``,
            ``iso_c``, ``iso_cts``) return ``W_0 + scaling * merged``; ``None`` (the default):
            1, or the default method's scaling with ``method="auto"``.
        include: regex on tensor names selecting the tensors that go through the method
            (default: every 2-D floating tensor); others are averaged.
        exclude: regex of tensors never sent through the method (default: embeddings and the
            output head); ``None`` or ``""`` disables it.
        allow_mismatch: accept different ``model_type``, tensor sets or shapes: tensors in one
            model only are copied from it, shape mismatches keep A's tensor (all reported).
        keep_identical: tensors that are bit-identical in every input are copied unchanged,
            whatever the method (see ``docs/fusion.md``); off: the raw formula runs.
        shard_size: maximum bytes per output safetensors shard.
        rgsp, ties, dare, iso_cts, regmean: each method's own settings.
    """

    method: str = AUTO
    scaling: float | None = None
    include: str | None = None
    exclude: str | None = DEFAULT_EXCLUDE
    allow_mismatch: bool = False
    keep_identical: bool = True
    shard_size: int = DEFAULT_SHARD_SIZE
    rgsp: RgspOptions = field(default_factory=RgspOptions)
    ties: TiesOptions = field(default_factory=TiesOptions)
    dare: DareOptions = field(default_factory=DareOptions)
    iso_cts: IsoCtsOptions = field(default_factory=IsoCtsOptions)
    regmean: RegMeanOptions = field(default_factory=RegMeanOptions)

    @property
    def info(self) -> Any:
        return FUSION_METHODS[self.method]

    @property
    def needs_base(self) -> bool:
        """Does this run need the common base C (task vectors, or RegMean's task-arithmetic fallback)?"""
        return self.info.needs_base or (self.method == "regmean" and self.regmean.fallback == "task_arithmetic")

    def group(self, method: str | None = None) -> Any:
        """The options group of ``method`` (default: the chosen one), or ``None``."""
        name = METHOD_GROUPS.get(method or self.method)
        return getattr(self, name) if name else None

    def for_kind(self, kind: str) -> FuseOptions:
        """These options with ``method="auto"`` and ``scaling=None`` resolved for ``kind`` (a key of DEFAULTS)."""
        method, scaling = DEFAULTS[kind] if self.method == AUTO else (self.method, baselines.DEFAULT_SCALING)
        return dataclasses.replace(self, method=method, scaling=scaling if self.scaling is None else self.scaling)

    def validate(self) -> None:
        """Raise :class:`FusionError` on an unknown method or an out-of-range value."""
        if self.method not in FUSION_METHODS:
            raise FusionError(f"unknown fusion method {self.method!r} (choose from {', '.join(FUSION_METHODS)})")
        _check(self.shard_size >= 1, f"shard size must be positive, got {self.shard_size}")
        for group_name in METHOD_GROUPS.values():
            group = getattr(self, group_name)
            if group_name != "regmean" or self.method == "regmean":  # calibration is required only when used
                group.validate()
        for name in ("include", "exclude"):
            text = getattr(self, name)
            try:
                re.compile(text or "")
            except re.error as exc:
                raise FusionError(f"{name} pattern {text!r} is not a valid regular expression ({exc})") from None

    def selected(self, name: str, tensor_ndim: int) -> bool:
        """Does tensor ``name`` go through the method (rather than being averaged)?"""
        # re caches compiled patterns, so searching by the pattern text is cheap.
        chosen = re.search(self.include, name) is not None if self.include else tensor_ndim == 2
        if self.exclude and re.search(self.exclude, name):
            return False
        return chosen and (tensor_ndim == 2 or not self.info.matrices_only)

    def to_dict(self) -> dict[str, Any]:
        """The settings that apply to this run: the shared ones and the chosen method's group, flat."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in METHOD_GROUPS.values()}
        if not self.info.uses_scaling and not (self.method == "regmean" and self.regmean.fallback != "average"):
            shared.pop("scaling")
        group = self.group()
        settings = dataclasses.asdict(group) if group is not None else {}
        for key in ("calibration", "model_calibration"):
            if key in settings and settings[key] is not None:
                value = settings[key]
                texts = value if key == "model_calibration" else [value]
                named = [f"<list of {len(t)} strings>" if isinstance(t, list | tuple) else str(t) for t in texts]
                settings[key] = named if key == "model_calibration" else named[0]
        return {**shared, **settings}


def resolve_options(options: FuseOptions | None, overrides: dict[str, Any], kind: str = "adapter") -> FuseOptions:
    """A validated copy of ``options`` with keyword ``overrides`` applied and the defaults of ``kind`` resolved.

    An override names a shared field (``scaling=0.5``), a whole group (``ties=TiesOptions(...)``
    or ``dare={"density": 0.3}``) or a group's field (``gamma=0.5``, ``density=0.3``): the
    chosen method's group gets it if it has that field, else every group that has it.
    """
    options = dataclasses.replace(options) if options is not None else FuseOptions()
    for group_name in METHOD_GROUPS.values():  # copies, so the caller's groups are never changed
        setattr(options, group_name, dataclasses.replace(getattr(options, group_name)))
    if "method" in overrides:
        options.method = overrides["method"]
    groups = set(METHOD_GROUPS.values())
    for name, value in overrides.items():
        if name.startswith("_"):
            raise TypeError(f"unknown fusion option {name!r}")
        if name in groups:
            current = getattr(options, name)
            setattr(options, name, dataclasses.replace(current, **value) if isinstance(value, dict) else value)
        elif name in {f.name for f in fields(options)}:
            setattr(options, name, value)
        else:
            chosen = DEFAULTS[kind][0] if options.method == AUTO else options.method
            own = options.group(chosen) if chosen in METHOD_GROUPS else None
            if own is not None and hasattr(own, name):
                setattr(own, name, value)
                continue
            targets = [getattr(options, g) for g in groups if hasattr(getattr(options, g), name)]
            if not targets:
                raise TypeError(f"unknown fusion option {name!r}")
            for target in targets:
                setattr(target, name, value)
    if options.method != AUTO and options.method not in FUSION_METHODS:
        options.validate()  # the unknown method's error
    options = options.for_kind(kind)
    options.validate()
    return options


__all__ = [
    "AUTO",
    "DEFAULTS",
    "DEFAULT_EXCLUDE",
    "DEFAULT_SHARD_SIZE",
    "DareOptions",
    "FuseOptions",
    "FusionError",
    "IsoCtsOptions",
    "RegMeanOptions",
    "RgspOptions",
    "TiesOptions",
    "check_calibration_count",
    "resolve_options",
]
