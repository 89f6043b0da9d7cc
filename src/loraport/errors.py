"""Exceptions raised by loraport.

Every error a user can cause (missing file, bad config, shape mismatch, corrupt tensor)
is a :class:`LoraportError`. The command line prints its message on one line and exits
with status 2; library users can catch it.
"""

from __future__ import annotations


class LoraportError(Exception):
    """Bad input: the message names the file or module and what was expected."""


class CheckpointError(LoraportError):
    """A base model directory, hub id, config or tensor file is missing or unreadable."""


class AdapterError(LoraportError):
    """A LoRA adapter directory is missing, malformed, unsupported or inconsistent."""


class TransferError(LoraportError):
    """The transfer cannot proceed (no matching modules, every module skipped, ...)."""
