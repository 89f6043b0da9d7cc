"""The batch manifest: ``defaults`` plus a ``jobs`` list, each job spelled like ``loraport transfer`` flags.

A job's keys are the ``transfer`` flags with underscores (``source_base`` for ``--source-base``,
``subspace_rank``, ``calibration``, ...); a job's keys override ``defaults``. Every job goes
through the parser the ``transfer`` sub-command is built with and the same
:func:`~loraport.port.options.options_from_args`, both derived from the declared options
(:mod:`loraport.port.options`), so a new option is a valid manifest key without any change here.

Example (YAML; JSON with the same structure works too)::

    defaults:
      source_base: models/qwen2.5-1.5b
      target_base: models/qwen2.5-1.5b-v2
      method: auto
    jobs:
      - {adapter: loras/support, out: ported/support}
      - {adapter: loras/sql, out: ported/sql, method: prolora, subspace_rank: 32}

Relative paths (``adapter``, ``out``, ``calibration``, ``report``, and bases that exist as
directories) are relative to the manifest's directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraportError
from ..port.options import TransferOptions, add_transfer_arguments, options_from_args

REQUIRED_KEYS = ("adapter", "source_base", "target_base", "out")
PATH_KEYS = ("adapter", "out", "calibration", "report")  # always local paths
BASE_KEYS = ("source_base", "target_base")  # a directory when one exists there, else a hub id
BATCH_KEYS = ("name",)  # manifest keys that are not transfer flags
# transfer flags a job may not set: the batch decides them for every job.
RESERVED_KEYS = {
    "overwrite": "the batch replaces only outputs it wrote; see loraport batch --overwrite",
    "quiet": "the batch shows its own progress; see loraport batch --quiet",
    "cache_dir": "every job shares the batch's subspace cache; see loraport batch --cache-dir",
    "no_cache": "every job shares the batch's subspace cache",
    "help": "not a job setting",
}


Problem = tuple[int, str]  # (job index, 0 for the manifest itself; one-line message)


class ManifestError(LoraportError):
    """A manifest that cannot run: every problem found, one per line in job order, before any work starts."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.problems = [text for _, text in sorted(problems, key=lambda problem: problem[0])]
        lines = [f"{source}: {len(problems)} problem(s), nothing was run:"] + [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass
class Job:
    """One port of a batch.

    Attributes:
        index: position in the manifest's ``jobs`` list (1-based).
        name: label in the summary (``name`` key, default: the output directory's name).
        adapter / source_base / target_base / out / report: as the ``transfer`` flags, paths absolute.
        options: the port's settings, built by the same code path as ``loraport transfer``.
        argv: the ``transfer`` flags this job amounts to (for messages).
    """

    index: int
    name: str
    adapter: str
    source_base: str
    target_base: str
    out: str
    report: str | None
    options: TransferOptions
    argv: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"job {self.index} ({self.name})"


class _FlagError(Exception):
    """argparse's complaint about one job's flags (instead of exiting the process)."""


class _JobParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _FlagError(message)


def transfer_flags() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """The ``transfer`` sub-command's parser and its flags by manifest key (``subspace_rank`` -> action)."""
    parser = _JobParser(prog="loraport transfer", add_help=False)
    add_transfer_arguments(parser)
    # Keyed by the flag's name, not its dest: ``keep_all: true`` is ``--keep-all`` (dest ``no_harm``).
    flags = {
        option[2:].replace("-", "_"): action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    return parser, flags


def read_manifest(path: str | os.PathLike[str]) -> Any:
    """The parsed YAML or JSON manifest file (``.json`` is read as JSON, anything else as YAML)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LoraportError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        detail = str(exc).replace("\n", " ")
        raise LoraportError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({detail})") from None


def _flag_value(key: str, value: Any, action: argparse.Action) -> list[str]:
    """``key: value`` as command-line words (``--subspace-rank 32``; ``true`` for a switch)."""
    flag = "--" + key.replace("_", "-")
    if action.nargs == 0:  # a switch such as --drop-unsupported
        if not isinstance(value, bool):
            raise _FlagError(f"{key}: expected true or false, got {value!r}")
        return [flag] if value else []
    if value is None:
        return []
    if isinstance(value, Mapping | list | tuple):
        raise _FlagError(f"{key}: expected a single value written as on the command line, got {value!r}")
    return [flag, str(value).lower() if isinstance(value, bool) else str(value)]


def _resolve(key: str, value: Any, root: Path) -> Any:
    if not isinstance(value, str) or not value:
        return value
    if key in PATH_KEYS:
        return str((root / Path(value).expanduser()).resolve())
    if key in BASE_KEYS:
        candidate = root / Path(value).expanduser()
        return str(candidate.resolve()) if candidate.is_dir() else value
    return value


def job_options(
    entry: Mapping[str, Any],
    cache_dir: str | os.PathLike[str],
    parser: argparse.ArgumentParser | None = None,
    flags: dict[str, argparse.Action] | None = None,
) -> tuple[argparse.Namespace, TransferOptions, list[str]]:
    """The one place a job mapping becomes transfer options: its keys as ``transfer`` flags, parsed
    by the ``transfer`` parser, turned into options as the command line does.

    Returns the parsed flags, the options (subspace cache set to the batch's ``cache_dir``) and
    the argv. Raises ``LoraportError`` naming the offending key.
    """
    if parser is None or flags is None:
        parser, flags = transfer_flags()
    argv: list[str] = []
    problems: list[str] = []
    for key, value in entry.items():
        action = flags.get(key)
        if key in BATCH_KEYS:
            continue
        if key in RESERVED_KEYS:
            problems.append(f"{key}: not allowed in a job: {RESERVED_KEYS[key]}")
        elif action is None:
            problems.append(f"unknown key {key!r} (keys are loraport transfer flags with underscores)")
        else:
            try:
                argv += _flag_value(key, value, action)
            except _FlagError as exc:
                problems.append(str(exc))
    try:
        args = parser.parse_args(argv)
        options = options_from_args(args)
        options.cache_dir = str(cache_dir)
        options.use_cache = True
        # The driver may have no GPU while the workers do: check everything but the device here.
        dataclasses.replace(options, device="cpu").validate()
    except _FlagError as exc:
        problems.append(str(exc).replace("argument --", "--"))
    except LoraportError as exc:
        problems.append(str(exc))
    if problems:
        raise LoraportError("; ".join(problems))
    return args, options, argv


def load_jobs(
    manifest: str | os.PathLike[str] | Mapping[str, Any],
    cache_dir: str | os.PathLike[str],
    device: str | None = None,
) -> tuple[list[Job], list[Problem], str]:
    """Read a manifest (a file or an already parsed mapping) into jobs.

    ``device`` is the default ``device`` of jobs that do not set one (``cuda`` when the batch
    asks for GPUs). Returns ``(jobs, problems, source)``: the jobs whose entries are valid, one
    line per problem found (all of them, not only the first), and the manifest's name for messages.
    """
    if isinstance(manifest, Mapping):
        data, root, source = manifest, Path.cwd(), "manifest"
    else:
        data, root, source = read_manifest(manifest), Path(manifest).resolve().parent, str(manifest)
    if not isinstance(data, Mapping):
        raise ManifestError(source, [(0, "expected a mapping with 'jobs' (and optionally 'defaults')")])
    problems: list[Problem] = [
        (0, f"unknown top-level key {key!r} (expected 'defaults' and 'jobs')")
        for key in data
        if key not in ("defaults", "jobs")
    ]
    defaults = data.get("defaults") or {}
    entries = data.get("jobs")
    if not isinstance(defaults, Mapping):
        problems.append((0, "'defaults' must be a mapping of transfer options"))
        defaults = {}
    if not isinstance(entries, list) or not entries:
        problems.append((0, "'jobs' must be a non-empty list of mappings"))
        entries = []
    parser, flags = transfer_flags()
    jobs: list[Job] = []
    outs: dict[str, int] = {}
    for index, raw in enumerate(entries, start=1):
        if not isinstance(raw, Mapping):
            problems.append((index, f"job {index}: expected a mapping, got {type(raw).__name__}"))
            continue
        entry: dict[str, Any] = {"device": device} if device else {}
        entry.update(defaults)
        entry.update(raw)
        name = str(entry.get("name") or Path(str(entry.get("out") or f"job-{index}")).name)
        label = f"job {index} ({name})"
        missing = [key for key in REQUIRED_KEYS if not entry.get(key)]
        if missing:
            problems.append((index, f"{label}: missing {', '.join(missing)}"))
            continue
        entry = {key: _resolve(key, value, root) for key, value in entry.items()}
        if entry["out"] in outs:
            problems.append((index, f"{label}: out {entry['out']} is also the output of job {outs[entry['out']]}"))
            continue
        outs[entry["out"]] = index
        try:
            args, options, argv = job_options(entry, cache_dir, parser, flags)
        except LoraportError as exc:
            problems.append((index, f"{label}: {exc}"))
            continue
        jobs.append(
            Job(
                index,
                name,
                args.adapter,
                args.source_base,
                args.target_base,
                args.out,
                args.report,
                options,
                tuple(argv),
            )
        )
    return jobs, problems, source


__all__ = ["Job", "ManifestError", "Problem", "job_options", "load_jobs", "read_manifest", "transfer_flags"]
