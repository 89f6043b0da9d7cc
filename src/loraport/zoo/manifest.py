"""Reading a built zoo: ``manifest.json`` with paths resolved against the zoo directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraportError

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    """A zoo's manifest (``data``, the parsed JSON) and where it lives (``root``).

    Paths in the JSON are relative to ``root``; the accessors return absolute paths.
    """

    root: Path
    data: dict[str, Any]

    @property
    def source(self) -> str:
        return self.data["source"]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.data["models"]

    @property
    def targets(self) -> list[str]:
        return [name for name in self.models if name != self.source]

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.data["tasks"]

    @property
    def loras(self) -> dict[str, dict[str, Any]]:
        return self.data.get("loras", {})

    def path(self, relative: str) -> Path:
        return self.root / relative

    def model_path(self, name: str) -> Path:
        if name not in self.models:
            raise LoraportError(f"{self.root / MANIFEST}: no model {name!r} (have {', '.join(self.models)})")
        return self.path(self.models[name]["path"])

    def lora(self, base: str, task: str) -> dict[str, Any] | None:
        """The manifest entry of the LoRA trained on ``base`` for ``task`` (``None`` if absent)."""
        return self.loras.get(f"{base}-{task}")

    def lora_path(self, base: str, task: str) -> Path:
        entry = self.lora(base, task)
        if entry is None:
            raise LoraportError(f"{self.root / MANIFEST}: no LoRA for base {base!r} and task {task!r}")
        return self.path(entry["path"])

    def eval_path(self, task: str) -> Path:
        if task not in self.tasks:
            raise LoraportError(f"{self.root / MANIFEST}: no task {task!r} (have {', '.join(self.tasks)})")
        return self.path(self.tasks[task]["eval"])

    def base_accuracy(self, base: str, task: str) -> float | None:
        entry = self.data.get("base_accuracy", {}).get(base, {}).get(task)
        return None if entry is None else entry["acc"]

    def oracle_accuracy(self, base: str, task: str) -> float | None:
        entry = self.lora(base, task)
        return None if entry is None else entry["acc"]

    @property
    def calibration_path(self) -> Path:
        return self.path(self.data["calibration"]["path"])


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read ``directory/manifest.json`` (a built zoo, or the shipped demo data)."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise LoraportError(f"{path}: no zoo manifest (build one with benchmarks/build_zoo.py)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoraportError(f"{path}: not valid JSON ({exc.msg})") from None
    for key in ("source", "models", "tasks"):
        if key not in data:
            raise LoraportError(f"{path}: missing {key!r}; not a zoo manifest")
    return Manifest(root, data)
