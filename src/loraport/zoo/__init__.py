"""Tiny model zoos: random ones for tests (:mod:`.tiny`), a trained one for the benchmarks and demo.

Public API::

    from loraport.zoo import build_zoo, load_manifest, demo_dir
    build_zoo("benchmarks/work/zoo")                 # ~15 min on 2 cores; quick=True: seconds
    zoo = load_manifest("benchmarks/work/zoo")
    zoo.lora_path("S", "facts"), zoo.model_path("D15"), zoo.eval_path("facts")
    load_manifest(demo_dir())                        # the small subset shipped with the package
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoraportError
from .manifest import Manifest, load_manifest

if TYPE_CHECKING:
    from .build import ZooConfig

__all__ = ["Manifest", "ZooConfig", "build_zoo", "demo_dir", "load_manifest"]


def build_zoo(out_dir: str | os.PathLike[str], quick: bool = False, **kwargs: Any) -> Path:
    """Build the quality zoo under ``out_dir``; see :func:`loraport.zoo.build.build_zoo`."""
    from .build import build_zoo as _build

    return _build(out_dir, quick, **kwargs)


def demo_dir() -> Path:
    """The installed demo zoo (``loraport/zoo/data``): a few models, one LoRA, its task, calibration text."""
    path = Path(str(resources.files("loraport.zoo") / "data"))
    if not (path / "manifest.json").is_file():
        raise LoraportError(f"{path}: the demo data is missing from this installation")
    return path


def __getattr__(name: str) -> Any:
    if name == "ZooConfig":
        from .build import ZooConfig

        return ZooConfig
    raise AttributeError(name)
