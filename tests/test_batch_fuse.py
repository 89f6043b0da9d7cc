"""``loraport batch`` fusion jobs (``fuse:``): the ``fuse`` flags as keys, one front with ``loraport.fuse()``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from loraport import batch, fuse, transfer
from loraport.batching import FuseJob, ManifestError
from loraport.batching.manifest import fuse_flags, fuse_job_args, load_jobs
from loraport.batching.plan import JOB_RECORD
from loraport.cli import build_parser, main

FUSED_FILES = ("adapter_model.safetensors", "adapter_config.json", "loraport_fusion_report.json", JOB_RECORD)


@pytest.fixture(scope="module")
def loras(zoo) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """The shared zoo's llama, its derivative, and two adapters on the llama (those of tests/test_batch.py)."""
    return {
        "base": zoo.llama,
        "derivative": zoo.llama_derivative,
        "one": zoo.llama_adapter,
        "two": zoo.adapter("llama-lora-batch2", zoo.llama, r=8, seed=2),
    }


def manifest_of(path: Path, loras: dict[str, Path], fuse_job: dict, fuse_defaults: dict | None = None) -> Path:
    """A transfer job and a fusion job; the fusion's models written relative to the manifest's directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    models = [os.path.relpath(loras[name], path.parent) for name in ("one", "two")]
    defaults: dict = {"source_base": str(loras["base"]), "target_base": str(loras["derivative"]), "method": "prolora"}
    if fuse_defaults is not None:
        defaults["fuse"] = fuse_defaults
    jobs = [
        {"adapter": str(loras["one"]), "out": "out/ported", "subspace_rank": 16},
        {"name": "both", "fuse": {"models": models, "out": "out/fused", **fuse_job}},
    ]
    path.write_text(yaml.safe_dump({"defaults": defaults, "jobs": jobs}))
    return path


def weights(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


def test_fuse_keys_go_through_the_fuse_command_line(loras, tmp_path: Path) -> None:
    entry = {
        "models": [str(loras["one"]), str(loras["two"])],
        "out": str(tmp_path / "fused"),
        "method": "dare",
        "density": 0.3,
        "dare_combine": "ties",
        "seed": 7,
        "rank": 6,
        "shard_size": "1GB",
        "allow_mismatch": True,
    }
    args, kind, argv = fuse_job_args(entry)
    assert kind == "adapter" and argv[:3] == ["--models", str(loras["one"]), str(loras["two"])]
    cli = build_parser().parse_args(["fuse", *argv])
    assert {k: v for k, v in vars(cli).items() if k not in ("command", "verbose")} == vars(args)
    assert args.density == 0.3 and args.seed == 7 and args.allow_mismatch and args.models == entry["models"]
    # Every fuse flag is a manifest key: the keys are read off the parser loraport fuse is built with.
    fuse_parser = next(a for a in build_parser()._actions if a.dest == "command").choices["fuse"]  # type: ignore[union-attr]
    options = {o[2:].replace("-", "_") for a in fuse_parser._actions for o in a.option_strings if o.startswith("--")}
    assert set(fuse_flags()[1]) == options - {"help"}
    assert {"models", "min_kept", "distill_steps", "calib_samples", "dare_combine"} <= options


def test_batch_fuse_job_equals_loraport_fuse_and_the_cli(loras, tmp_path: Path, capsys) -> None:
    manifest = manifest_of(tmp_path / "m" / "jobs.yaml", loras, {"density": 0.5}, fuse_defaults={"method": "ties"})
    jobs, problems, _ = load_jobs(manifest, tmp_path / "cache")
    assert problems == [] and isinstance(jobs[1], FuseJob)
    assert jobs[1].args.models == [str(loras["one"]), str(loras["two"])]  # relative to the manifest
    assert jobs[1].out == str(tmp_path / "m" / "out" / "fused") and jobs[1].name == "both"

    result = batch(manifest, workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert result.ok and [job.status for job in result.jobs] == ["ok", "ok"]
    ported, fused = tmp_path / "m" / "out" / "ported", tmp_path / "m" / "out" / "fused"
    assert all((fused / name).is_file() for name in FUSED_FILES)
    assert sorted(p.name for p in fused.parent.iterdir()) == ["fused", "ported"]  # no temporaries left

    direct = fuse(loras["one"], loras["two"], tmp_path / "direct", method="ties", density=0.5, progress=False)
    assert weights(fused) == weights(tmp_path / "direct")
    assert (fused / "adapter_config.json").read_text() == (tmp_path / "direct" / "adapter_config.json").read_text()
    code = main(["fuse", "--models", str(loras["one"]), str(loras["two"]), "--out", str(tmp_path / "cli"),
                 "--method", "ties", "--density", "0.5", "--quiet"])  # fmt: skip
    assert code == 0 and weights(fused) == weights(tmp_path / "cli")
    transfer(loras["one"], loras["base"], loras["derivative"], tmp_path / "alone", method="prolora",
             subspace_rank=16, cache_dir=tmp_path / "c2")  # fmt: skip
    assert weights(ported) == weights(tmp_path / "alone")

    report = json.loads((fused / "loraport_fusion_report.json").read_text())
    assert report["output"] == str(fused) and report["method"] == "ties"
    assert result.jobs[1].method == "ties" and result.jobs[1].modules == len(direct.report.records)
    row = result.table().splitlines()[3]
    assert row.startswith(f"| both | ties | {len(direct.report.records)} | - | ") and row.endswith("| ok |")
    assert result.summary["subspaces"]["distinct"] > 0  # the transfer job's; the fusion needs none

    again = batch(manifest, workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert [job.status for job in again.jobs] == ["up to date", "up to date"]
    assert again.jobs[1].method == "ties" and again.jobs[1].modules == result.jobs[1].modules
    manifest_of(manifest, loras, {"density": 0.3}, fuse_defaults={"method": "ties"})  # a fuse flag changed
    third = batch(manifest, workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert [job.status for job in third.jobs] == ["up to date", "ok"]
    assert json.loads((fused / JOB_RECORD).read_text())["flags"]["density"] == 0.3
    assert weights(fused) != weights(tmp_path / "direct")


def test_bad_fuse_jobs_are_one_line_errors_and_nothing_runs(loras, tmp_path: Path, capsys) -> None:
    one, two = str(loras["one"]), str(loras["two"])
    foreign = tmp_path / "out" / "foreign"
    foreign.mkdir(parents=True)
    jobs = [
        {"adapter": one, "out": "out/ported"},  # fine, but nothing may run
        {"fuse": {"models": [one, two], "out": "out/a", "frobnicate": 1, "overwrite": True}},
        {"fuse": {"models": [one, two]}},
        {"fuse": {"models": [one], "out": "out/b"}},
        {"fuse": {"models": [one, two], "out": "out/c", "method": "regmean", "calibration": ["x", "y", "z"]}},
        {"fuse": {"models": [one, two], "out": "out/d", "method": "distill", "prompts": ["p"], "bases": ["b"]}},
        {"fuse": {"models": [one, two], "out": "out/e", "method": "magic"}},
        {"fuse": {"models": [one, two], "out": "out/f.gguf"}},
        {"fuse": {"models": [one, two], "out": "out/g", "method": "ties", "density": 2}},
        {"fuse": {"models": [one, str(loras["base"])], "out": "out/h"}},
        {"fuse": {"models": [one, two], "out": "out/foreign"}},
        {"fuse": {"models": [one, two], "out": "out/i"}, "adapter": one},
    ]
    manifest = tmp_path / "jobs.yaml"
    defaults = {"source_base": str(loras["base"]), "target_base": str(loras["derivative"])}
    manifest.write_text(yaml.safe_dump({"defaults": defaults, "jobs": jobs}))
    capsys.readouterr()
    code = main(["batch", str(manifest), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == f"loraport: error: {manifest}: 11 problem(s), nothing was run:"
    expected = [
        "job 2 (a): unknown key 'frobnicate' (keys are loraport fuse flags with underscores); overwrite: not allowed",
        "job 3 (job-3): missing out",
        "job 4 (b): --models needs at least two inputs, got 1",
        "job 5 (c): 3 calibration texts for 2 models",
        "job 6 (d): --prompts: 1 prompt file(s) for 2 adapters",
        "job 7 (e): --method: invalid choice: 'magic'",
        "job 8 (f.gguf): out ",
        "job 9 (g): density must be in (0, 1], got 2.0",
        "job 10 (h): ",
        "job 11 (foreign): ",
        "job 12: a fusion job is {fuse: {fuse flags}} with an optional name; got 'adapter' beside it",
    ]
    assert len(lines) == 1 + len(expected)
    for line, start in zip(lines[1:], expected, strict=True):
        assert line.strip().startswith(start), (line, start)
    assert "a directory" in lines[7] and "is a LoRA adapter but the other input is not" in lines[9]
    assert "not written by loraport batch" in lines[10]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["foreign"]  # job 1 did not run either
    assert not (tmp_path / "jobs.summary.json").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(ManifestError, match="unknown key 'frobnicate'"):
        batch({"jobs": jobs[1:2]}, workers=1, cache_dir=tmp_path / "cache", progress=False)


def test_a_failed_fuse_job_leaves_nothing_half_written_and_the_others_go_on(loras, tmp_path, monkeypatch) -> None:
    import loraport.fusion.lora as fusion_lora

    real_save = fusion_lora.save_adapter

    def save_then_fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        real_save(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(fusion_lora, "save_adapter", save_then_fail)
    manifest = manifest_of(tmp_path / "jobs.yaml", loras, {"method": "task_arithmetic"})
    result = batch(manifest, workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert [job.status for job in result.jobs] == ["ok", "failed"] and not result.ok
    assert result.jobs[1].error == "OSError: disk full" and result.jobs[1].method == "task_arithmetic"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ported"]  # no output, no temporary
    monkeypatch.setattr(fusion_lora, "save_adapter", real_save)
    resumed = batch(manifest, workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert [job.status for job in resumed.jobs] == ["up to date", "ok"]
    direct = fuse(loras["one"], loras["two"], tmp_path / "direct", method="task_arithmetic", progress=False)
    assert direct.output is not None and weights(tmp_path / "out" / "fused") == weights(direct.output)
