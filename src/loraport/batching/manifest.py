"""The batch manifest: ``defaults`` plus a ``jobs`` list, each job spelled like ``loraport transfer`` or ``fuse`` flags.

A transfer job's keys are the ``transfer`` flags with underscores (``source_base`` for
``--source-base``, ``subspace_rank``, ``calibration``, ...); a job's keys override ``defaults``.
A fusion job is a mapping with one key, ``fuse``, holding the ``loraport fuse`` flags with
underscores (``models``, ``out``, ``method``, ``density``, ...; a flag taking several values
takes a list), and optionally ``name`` beside it; ``defaults.fuse`` holds the defaults of the
fusion jobs (the rest of ``defaults`` is for the transfer jobs only). Every job goes through
the parser its sub-command is built with (:func:`~loraport.port.options.add_transfer_arguments`,
:func:`~loraport.fusion.arguments.add_fuse_arguments`) and the same code that turns the flags
into settings, so a new option is a valid manifest key without any change here. A fusion job
is also checked as ``loraport fuse`` checks its command line (:func:`loraport.api.check_fuse_args`:
input counts and kinds, the method's settings) before any job starts.

Example (YAML; JSON with the same structure works too)::

    defaults:
      source_base: models/qwen2.5-1.5b
      target_base: models/qwen2.5-1.5b-v2
      method: auto
      fuse: {method: ties, density: 0.5}
    jobs:
      - {adapter: loras/support, out: ported/support}
      - {adapter: loras/sql, out: ported/sql, method: prolora, subspace_rank: 32}
      - name: support+sql
        fuse: {models: [loras/support, loras/sql], out: fused/support-sql}

Relative paths (``adapter``, ``out``, ``calibration``, ``report``, ``prompts``, and bases,
``models``, ``base``, ``bases`` and ``target_base`` that exist there) are relative to the
manifest's directory; anything else given as a base or model is a hub id.
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

from ..api import check_fuse_args
from ..errors import LoraportError
from ..fusion.arguments import add_fuse_arguments
from ..port.options import TransferOptions, add_transfer_arguments, options_from_args

REQUIRED_KEYS = ("adapter", "source_base", "target_base", "out")
PATH_KEYS = ("adapter", "out", "calibration", "report")  # always local paths
BASE_KEYS = ("source_base", "target_base")  # a directory when one exists there, else a hub id
BATCH_KEYS = ("name",)  # manifest keys that are not transfer flags
FUSE = "fuse"  # a fusion job's key: {fuse: {...fuse flags...}}, and defaults.fuse
FUSE_REQUIRED_KEYS = ("models", "out")
FUSE_PATH_KEYS = ("out", "report", "prompts", "calibration")  # always local paths
FUSE_BASE_KEYS = ("models", "base", "bases", "target_base")  # local when they exist there, else hub ids
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

    @property
    def method(self) -> str:
        return self.options.method


@dataclass
class FuseJob:
    """One fusion of a batch (a ``fuse:`` job).

    Attributes:
        index / name / label: as for :class:`Job`.
        out / report: as the ``fuse`` flags, paths absolute.
        args: the parsed ``fuse`` flags (paths absolute), run by :func:`loraport.api.fuse_from_args`.
        kind: the inputs' kind (``adapter``, ``image`` or ``model``).
        argv: the ``fuse`` flags this job amounts to (for messages).
    """

    index: int
    name: str
    out: str
    report: str | None
    args: argparse.Namespace
    kind: str
    argv: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"job {self.index} ({self.name})"

    @property
    def method(self) -> str:
        return str(self.args.method)

    @property
    def inputs(self) -> list[str]:
        """Every input the fusion reads (models, bases, prompt and calibration files), as given."""
        args = self.args
        singles = [args.base, args.target_base]
        lists = [args.models, args.bases, args.prompts, args.calibration]
        return [str(v) for v in singles if v] + [str(v) for values in lists for v in values or ()]


BatchJob = Job | FuseJob


class _FlagError(Exception):
    """argparse's complaint about one job's flags (instead of exiting the process)."""


class _JobParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _FlagError(message)


def transfer_flags() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """The ``transfer`` sub-command's parser and its flags by manifest key (``subspace_rank`` -> action)."""
    parser = _JobParser(prog="loraport transfer", add_help=False)
    add_transfer_arguments(parser)
    return parser, _flags_by_key(parser)


def fuse_flags() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """The ``fuse`` sub-command's parser and its flags by manifest key (``min_kept`` -> action)."""
    parser = _JobParser(prog="loraport fuse", add_help=False)
    add_fuse_arguments(parser)
    return parser, _flags_by_key(parser)


def _flags_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    # Keyed by the flag's name, not its dest: ``keep_all: true`` is ``--keep-all`` (dest ``no_harm``).
    return {
        option[2:].replace("-", "_"): action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }


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
    several = action.nargs in ("+", "*")  # --models A B: a list (or one value)
    if isinstance(value, Mapping) or (isinstance(value, list | tuple) and not several):
        raise _FlagError(f"{key}: expected a single value written as on the command line, got {value!r}")
    values = list(value) if isinstance(value, list | tuple) else [value]
    if any(isinstance(v, Mapping | list | tuple) for v in values):
        raise _FlagError(f"{key}: expected a list of values written as on the command line, got {value!r}")
    return [flag, *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]


def _resolve(key: str, value: Any, root: Path, fuse: bool = False) -> Any:
    """``value`` of ``key`` with a relative path made absolute from ``root``; a base (a model: a ``fuse``
    input) only when it exists there (a transfer base: as a directory), else it is a hub id."""
    if isinstance(value, list | tuple):
        return [_resolve(key, item, root, fuse) for item in value]
    if not isinstance(value, str) or not value:
        return value
    if key in (FUSE_PATH_KEYS if fuse else PATH_KEYS):
        return str((root / Path(value).expanduser()).resolve())
    if key in (FUSE_BASE_KEYS if fuse else BASE_KEYS):
        candidate = root / Path(value).expanduser()
        found = candidate.exists() if fuse else candidate.is_dir()  # fuse inputs may be files (kohya, GGUF)
        return str(candidate.resolve()) if found else value
    return value


def _argv(entry: Mapping[str, Any], flags: dict[str, argparse.Action], command: str) -> tuple[list[str], list[str]]:
    """A job's keys as command-line words, and one problem per key that is not a usable flag."""
    argv: list[str] = []
    problems: list[str] = []
    for key, value in entry.items():
        action = flags.get(key)
        if key in BATCH_KEYS:
            continue
        if key in RESERVED_KEYS and (action is not None or key == "help"):
            problems.append(f"{key}: not allowed in a job: {RESERVED_KEYS[key]}")
        elif action is None:
            problems.append(f"unknown key {key!r} (keys are loraport {command} flags with underscores)")
        else:
            try:
                argv += _flag_value(key, value, action)
            except _FlagError as exc:
                problems.append(str(exc))
    return argv, problems


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
    argv, problems = _argv(entry, flags, "transfer")
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


def fuse_job_args(
    entry: Mapping[str, Any],
    parser: argparse.ArgumentParser | None = None,
    flags: dict[str, argparse.Action] | None = None,
) -> tuple[argparse.Namespace, str, list[str]]:
    """The one place a ``fuse:`` job's mapping becomes a fusion: its keys as ``fuse`` flags, parsed by
    the ``fuse`` parser and checked as ``loraport fuse`` checks its command line.

    Returns the parsed flags, the inputs' kind and the argv. Raises ``LoraportError`` naming the
    offending key or flag.
    """
    if parser is None or flags is None:
        parser, flags = fuse_flags()
    argv, problems = _argv(entry, flags, "fuse")
    try:
        args = parser.parse_args(argv)
    except _FlagError as exc:
        problems.append(str(exc).replace("argument --", "--"))
    if problems:
        raise LoraportError("; ".join(problems))
    if str(args.out).endswith((".gguf", ".safetensors")):
        raise LoraportError(
            f"out {args.out}: a batch writes each job into a directory (with its record); "
            "set out_format for the file format there"
        )
    return args, check_fuse_args(args), argv


def _fuse_entry(raw: Mapping[str, Any], defaults: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A ``fuse:`` job's settings over ``defaults.fuse`` (``name`` beside ``fuse`` kept as the label)."""
    settings = raw[FUSE]
    beside = [key for key in raw if key not in (FUSE, "name")]
    if not isinstance(settings, Mapping) or beside:
        found = f"; got {', '.join(map(repr, beside))} beside it" if beside else ""
        raise LoraportError(f"job {index}: a fusion job is {{fuse: {{fuse flags}}}} with an optional name{found}")
    entry = {**defaults, **settings}
    if raw.get("name"):
        entry["name"] = raw["name"]
    return entry


def load_jobs(
    manifest: str | os.PathLike[str] | Mapping[str, Any],
    cache_dir: str | os.PathLike[str],
    device: str | None = None,
) -> tuple[list[BatchJob], list[Problem], str]:
    """Read a manifest (a file or an already parsed mapping) into jobs (:class:`Job`, :class:`FuseJob`).

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
    defaults = dict(defaults)
    fuse_defaults = defaults.pop(FUSE, None) or {}
    if not isinstance(fuse_defaults, Mapping):
        problems.append((0, "'defaults.fuse' must be a mapping of fuse flags"))
        fuse_defaults = {}
    if not isinstance(entries, list) or not entries:
        problems.append((0, "'jobs' must be a non-empty list of mappings"))
        entries = []
    parser, flags = transfer_flags()
    fuse_parser, fuse_keys = fuse_flags()
    jobs: list[BatchJob] = []
    outs: dict[str, int] = {}
    for index, raw in enumerate(entries, start=1):
        if not isinstance(raw, Mapping):
            problems.append((index, f"job {index}: expected a mapping, got {type(raw).__name__}"))
            continue
        fusion = FUSE in raw
        entry: dict[str, Any] = {"device": device} if device else {}
        try:
            entry.update(_fuse_entry(raw, fuse_defaults, index) if fusion else {**defaults, **raw})
        except LoraportError as exc:
            problems.append((index, str(exc)))
            continue
        name = str(entry.get("name") or Path(str(entry.get("out") or f"job-{index}")).name)
        label = f"job {index} ({name})"
        missing = [key for key in (FUSE_REQUIRED_KEYS if fusion else REQUIRED_KEYS) if not entry.get(key)]
        if missing:
            problems.append((index, f"{label}: missing {', '.join(missing)}"))
            continue
        entry = {key: _resolve(key, value, root, fusion) for key, value in entry.items()}
        if entry["out"] in outs:
            problems.append((index, f"{label}: out {entry['out']} is also the output of job {outs[entry['out']]}"))
            continue
        outs[entry["out"]] = index
        try:
            if fusion:
                fused, kind, argv = fuse_job_args(entry, fuse_parser, fuse_keys)
                jobs.append(FuseJob(index, name, fused.out, fused.report, fused, kind, tuple(argv)))
                continue
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


__all__ = [
    "FUSE",
    "BatchJob",
    "FuseJob",
    "Job",
    "ManifestError",
    "Problem",
    "fuse_flags",
    "fuse_job_args",
    "job_options",
    "load_jobs",
    "read_manifest",
    "transfer_flags",
]
