"""``loraport batch``: manifest -> transfer options, one subspace pass, resumability, bad input, pools, Ray."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from loraport import batch, transfer
from loraport.batching import ManifestError, RayOptions
from loraport.batching.manifest import RESERVED_KEYS, job_options, load_jobs, transfer_flags
from loraport.batching.plan import JOB_RECORD, plan_batch, subspace_tasks
from loraport.batching.pools import size_local_pool
from loraport.cli import build_parser, main
from loraport.port.options import options_from_args

OUTPUT_FILES = ("adapter_model.safetensors", "adapter_config.json", "loraport_report.json", JOB_RECORD)


def write_manifest(path: Path, defaults: dict, jobs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"defaults": defaults, "jobs": jobs}))
    return path


@pytest.fixture(scope="module")
def bases(zoo) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """The shared zoo's llama, its derivative, a Gemma-2 of other widths, and three adapters on the llama."""
    return {
        "source": zoo.llama,
        "derivative": zoo.llama_derivative,
        "gemma": zoo.gemma2,
        "lora1": zoo.llama_adapter,
        "lora2": zoo.adapter("llama-lora-batch2", zoo.llama, r=8, seed=2),
        "lora3": zoo.adapter("llama-lora-batch3", zoo.llama, r=4, seed=3),
    }


def three_jobs(bases: dict[str, Path], out: str = "out") -> tuple[dict, list[dict]]:
    """Two ports to the derivative (same subspaces) and one to the Gemma-2 (other widths)."""
    defaults = {"source_base": str(bases["source"]), "target_base": str(bases["derivative"]), "method": "prolora"}
    jobs = [
        {"adapter": str(bases["lora1"]), "out": f"{out}/one", "subspace_rank": 16},
        {"adapter": str(bases["lora2"]), "out": f"{out}/two", "subspace_rank": 16},
        {"adapter": str(bases["lora3"]), "out": f"{out}/three", "target_base": str(bases["gemma"])},
    ]
    return defaults, jobs


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the manifest ------------------------------------------------------------------------------


def test_job_keys_go_through_the_transfer_command_line(tmp_path: Path) -> None:
    entry = {
        "adapter": "a",
        "source_base": "s",
        "target_base": "t",
        "out": "o",
        "method": "prolora",
        "subspace_rank": 32,
        "threshold_by_type": "q_proj=0.2",
        "layer_map": "0:0,1:0",
        "drop_unsupported": True,
        "svd": "exact",
        "keep_all": True,  # a switch whose dest (no_harm) is not its name
        "calib_rank": 4,  # a calibrated-group flag
    }
    _, options, argv = job_options(entry, tmp_path)
    cli = build_parser().parse_args(["transfer", *argv])
    expected = options_from_args(cli)
    expected.cache_dir = str(tmp_path)
    assert asdict(options) == asdict(expected)
    assert options.subspace_rank == 32 and options.threshold_by_type == {"q_proj": 0.2}
    assert options.layer_map == {0: 0, 1: 0} and options.drop_unsupported and options.svd == "exact"
    assert options.calibrated.no_harm is False and options.calibrated.rank == 4
    # Every transfer flag but the batch-controlled ones is a manifest key.
    _, flags = transfer_flags()
    assert {"calibration", "calib_rank", "ridge", "init", "threshold", "fallback", "keep_all"} <= set(flags)
    assert set(RESERVED_KEYS) - {"help"} <= set(flags)


def test_a_new_transfer_flag_is_a_manifest_key_without_changes(tmp_path: Path, monkeypatch) -> None:
    """An option declared once (a field with option()) is a transfer flag and a manifest key."""
    from dataclasses import dataclass

    import loraport.port.options as port_options
    from loraport.option_fields import declared, option

    @dataclass
    class Extra:
        brand_new_setting: int = option(0, flag="brand_new_setting", word=int, help="a new setting")

    original = port_options.declared_options

    def extended():  # type: ignore[no-untyped-def]
        yield from original()
        for field, spec in declared(Extra):
            yield None, field, spec

    monkeypatch.setattr(port_options, "declared_options", extended)
    entry = {"adapter": "a", "source_base": "s", "target_base": "t", "out": "o", "brand_new_setting": 5}
    args, options, argv = job_options(entry, tmp_path)
    assert args.brand_new_setting == 5 and "--brand-new-setting" in argv
    assert options.brand_new_setting == 5  # type: ignore[attr-defined]
    cli = build_parser().parse_args(["transfer", "--adapter", "a", "--source-base", "s", "--target-base", "t",
                                     "--out", "o", "--brand-new-setting", "7"])  # fmt: skip
    assert options_from_args(cli).brand_new_setting == 7  # type: ignore[attr-defined]


def test_defaults_are_overridden_and_paths_are_relative_to_the_manifest(bases, tmp_path: Path) -> None:
    defaults, jobs = three_jobs(bases)
    jobs[0]["report"] = "reports/one.json"
    manifest = write_manifest(tmp_path / "ports.yaml", defaults, jobs)
    loaded, problems, _ = load_jobs(manifest, tmp_path / "cache")
    assert problems == []
    assert loaded[0].report == str(tmp_path / "reports" / "one.json") and loaded[1].report is None
    assert [job.options.subspace_rank for job in loaded] == [16, 16, 64]
    assert loaded[2].target_base == str(bases["gemma"]) and loaded[0].target_base == str(bases["derivative"])
    assert loaded[0].out == str(tmp_path / "out" / "one") and loaded[0].name == "one"
    assert all(job.options.cache_dir == str(tmp_path / "cache") for job in loaded)


def test_bad_manifest_lists_every_problem_before_any_work(bases, tmp_path: Path, capsys) -> None:
    defaults = {"source_base": str(bases["source"]), "target_base": str(bases["derivative"])}
    foreign = tmp_path / "out" / "foreign"
    foreign.mkdir(parents=True)
    jobs = [
        {"adapter": str(bases["lora1"])},  # no out
        {"adapter": str(bases["lora1"]), "out": "out/a", "method": "magic"},
        {"adapter": str(tmp_path / "no-such-adapter"), "out": "out/b"},
        {"adapter": str(bases["lora2"]), "out": "out/c", "frobnicate": 1, "subspace_rank": 0},
        {"adapter": str(bases["lora2"]), "out": "out/c"},
        {"adapter": str(bases["lora3"]), "out": "out/d", "cache_dir": "/elsewhere"},
        {"adapter": str(bases["lora3"]), "out": "out/foreign"},
        {"adapter": str(bases["lora3"]), "out": "out/e", "target_base": str(tmp_path / "no-such-model")},
        {"adapter": str(bases["lora1"]), "out": "out/ok"},
    ]
    manifest = write_manifest(tmp_path / "ports.yaml", defaults, jobs)
    code, out, err = run_cli(capsys, "batch", str(manifest), "--cache-dir", str(tmp_path / "cache"), "--quiet")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[0] == f"loraport: error: {manifest}: 8 problem(s), nothing was run:"
    expected = [
        "job 1 (job-1): missing out",
        "job 2 (a): --method: invalid choice: 'magic'",
        "job 3 (b): ",
        "job 4 (c): unknown key 'frobnicate'",
        "job 5 (c): out ",
        "job 6 (d): cache_dir: not allowed in a job",
        "job 7 (foreign): ",
        "job 8 (e): ",
    ]
    for line, start in zip(lines[1:], expected, strict=False):
        assert line.strip().startswith(start), (line, start)
    assert "adapter directory not found" in lines[3] and "subspace rank must be >= 1" in lines[4]
    assert "also the output of job 4" in lines[5] and "not written by loraport batch" in lines[7]
    assert "no-such-model" in lines[8]
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["foreign"]  # job 9 did not run either
    assert not (tmp_path / "ports.summary.json").exists() and not (tmp_path / "cache").exists()


def test_unreadable_manifests_are_one_line_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.yaml").write_text("jobs: [unclosed\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, message in (
        ("broken.yaml", "not valid YAML"),
        ("list.json", "expected a mapping with 'jobs'"),
        ("missing.yaml", "cannot read the manifest"),
    ):
        code, _, err = run_cli(capsys, "batch", str(tmp_path / name), "--quiet")
        assert code == 2 and message in err, err
    code, _, err = run_cli(capsys, "batch", str(tmp_path / "list.json"), "--gpus-per-job", "1")
    assert code == 2 and "--gpus-per-job needs --ray" in err


# -- running a batch ------------------------------------------------------------------------------


def test_batch_equals_separate_transfers_and_computes_each_subspace_once(bases, tmp_path: Path) -> None:
    defaults, jobs = three_jobs(bases)
    manifest = write_manifest(tmp_path / "ports.yaml", defaults, jobs)
    result = batch(manifest, workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert result.ok and [job.status for job in result.jobs] == ["ok", "ok", "ok"]
    summary = json.loads((tmp_path / "ports.summary.json").read_text())
    assert summary == result.summary and summary["succeeded"] == 3 and summary["executor"]["workers"] == 1
    sub = summary["subspaces"]
    # Jobs one and two need the same subspaces: planned once, computed once, then only read.
    assert sub["computed"] == sub["distinct"] > 0 and sub["cached_before"] == 0
    assert all(job.cache_misses == 0 for job in result.jobs)
    assert result.jobs[0].cache_hits == result.jobs[1].cache_hits
    assert result.jobs[0].cache_hits + result.jobs[2].cache_hits == sub["distinct"]
    for job, spec in zip(result.jobs, jobs, strict=True):
        out = tmp_path / spec["out"]
        assert all((out / name).is_file() for name in OUTPUT_FILES)
        options = {k: v for k, v in {**defaults, **spec}.items() if k not in ("adapter", "out")}
        source, target = options.pop("source_base"), options.pop("target_base")
        alone = transfer(
            spec["adapter"], source, target, tmp_path / "alone" / out.name, cache_dir=tmp_path / "c2", **options
        )
        assert adapter_bytes(out) == adapter_bytes(tmp_path / "alone" / out.name)
        assert job.modules == alone.report.output_modules
        assert job.mean_kept_energy == pytest.approx(alone.report.totals()["mean_kept_energy"])
    table = result.table().splitlines()
    assert table[0] == "| job | method | modules | mean kept energy | time (s) | status |"
    assert len(table) == 5 and table[2].startswith("| one | prolora | ")


def test_resume_skips_done_jobs_and_redoes_changed_ones(bases, tmp_path: Path) -> None:
    defaults, jobs = three_jobs(bases)
    manifest = write_manifest(tmp_path / "ports.yaml", defaults, jobs)
    options = {"workers": 1, "cache_dir": tmp_path / "cache", "progress": False}
    assert batch(manifest, **options).ok
    stamps = {spec["out"]: (tmp_path / spec["out"] / JOB_RECORD).stat().st_mtime_ns for spec in jobs}

    again = batch(manifest, **options)
    assert [job.status for job in again.jobs] == ["up to date"] * 3
    assert again.summary["subspaces"]["distinct"] == 0
    assert again.jobs[0].modules is not None  # figures come from the earlier report
    assert stamps == {spec["out"]: (tmp_path / spec["out"] / JOB_RECORD).stat().st_mtime_ns for spec in jobs}

    jobs[1]["subspace_rank"] = 8  # an option changed
    write_manifest(manifest, defaults, jobs)
    os.utime(bases["lora3"] / "adapter_model.safetensors")  # an input changed
    third = batch(manifest, **options)
    assert [job.status for job in third.jobs] == ["up to date", "ok", "ok"]
    record = json.loads((tmp_path / jobs[1]["out"] / JOB_RECORD).read_text())
    assert record["options"]["subspace_rank"] == 8


def test_a_failed_job_is_reported_and_the_others_go_on(bases, tmp_path: Path, capsys) -> None:
    defaults, jobs = three_jobs(bases)
    jobs[1]["threshold"] = 0.9999  # every module of job two is below it: nothing to write
    manifest = write_manifest(tmp_path / "ports.yaml", defaults, jobs)
    args = ["batch", str(manifest), "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("| two |"))
    assert "| failed: every module was skipped" in row
    assert "3 job(s): 2 ok, 0 up to date, 1 failed" in out
    assert (tmp_path / "out" / "one").is_dir() and (tmp_path / "out" / "three").is_dir()
    assert not (tmp_path / "out" / "two").exists()
    summary = json.loads((tmp_path / "ports.summary.json").read_text())
    assert summary["failed"] == 1 and not summary["ok"]
    code, out, _ = run_cli(capsys, *args)  # the failed job is tried again, the others are done
    assert code == 1 and "3 job(s): 0 ok, 2 up to date, 1 failed" in out


def test_an_output_no_batch_wrote_needs_overwrite(bases, tmp_path: Path) -> None:
    defaults, jobs = three_jobs(bases)
    manifest = write_manifest(tmp_path / "ports.yaml", defaults, jobs[:1])
    (tmp_path / "out" / "one").mkdir(parents=True)
    (tmp_path / "out" / "one" / "mine.txt").write_text("keep")
    with pytest.raises(ManifestError, match="not written by loraport batch"):
        batch(manifest, workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "out" / "one" / "mine.txt").exists()
    assert batch(manifest, workers=1, cache_dir=tmp_path / "cache", progress=False, overwrite=True).ok
    assert not (tmp_path / "out" / "one" / "mine.txt").exists()


def test_an_interrupted_batch_leaves_only_complete_outputs_and_resumes(bases, tmp_path: Path, monkeypatch) -> None:
    transfer_module = importlib.import_module("loraport.llm.port")  # the language-model front writes the adapter

    defaults, jobs = three_jobs(bases)
    manifest = write_manifest(tmp_path / "ports.yaml", defaults, jobs)
    real_save = transfer_module.save_adapter
    calls = []

    def save_then_interrupt(*args, **kwargs):  # type: ignore[no-untyped-def]
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C while the second job is writing
            raise KeyboardInterrupt

    monkeypatch.setattr(transfer_module, "save_adapter", save_then_interrupt)
    options = {"workers": 1, "cache_dir": tmp_path / "cache", "progress": False}
    with pytest.raises(KeyboardInterrupt):
        batch(manifest, **options)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["one"]  # no second output, no temporary directory
    assert all((out / "one" / name).is_file() for name in OUTPUT_FILES)
    summary = json.loads((tmp_path / "ports.summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["ok", "interrupted", "interrupted"]
    assert summary["interrupted"] == 2 and not summary["ok"]
    monkeypatch.setattr(transfer_module, "save_adapter", real_save)
    resumed = batch(manifest, **options)
    assert [job.status for job in resumed.jobs] == ["up to date", "ok", "ok"]


def test_process_pool_equals_in_process_and_sigterm_leaves_only_complete_outputs(bases, tmp_path: Path) -> None:
    defaults, jobs = three_jobs(bases)
    jobs = jobs + [dict(spec, out=spec["out"] + "-again") for spec in jobs]  # six jobs, so the pool is busy
    single = batch(
        write_manifest(tmp_path / "single.yaml", defaults, jobs), workers=1, cache_dir=tmp_path / "c1", progress=False
    )
    assert single.ok

    # Two pool processes; SIGTERM as soon as the first port is written.
    pooled = write_manifest(tmp_path / "pool.yaml", defaults, [dict(spec, out="pool-" + spec["out"]) for spec in jobs])
    command = [sys.executable, "-m", "loraport.cli", "batch", str(pooled), "--workers", "2", "--quiet"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([*command, "--cache-dir", str(tmp_path / "c2")], env=env, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "pool-out" / "one" / JOB_RECORD
    deadline = time.monotonic() + 600  # generous: a loaded 2-core machine is slow to reach phase 2
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err  # 0 only if every job had finished first
    if proc.returncode == 130:
        assert "loraport: interrupted" in err
    summary = json.loads((tmp_path / "pool.summary.json").read_text())
    assert summary["executor"]["workers"] == 2
    assert summary["subspaces"]["computed"] == summary["subspaces"]["distinct"]  # phase 1 was complete
    written = sorted((tmp_path / "pool-out").iterdir())
    assert written and all(not p.name.startswith(".") for p in written), written  # no temporary directories
    for out in written:
        assert all((out / name).is_file() for name in OUTPUT_FILES), out
        assert adapter_bytes(out) == adapter_bytes(tmp_path / "out" / out.name)
    ok = {job["out"] for job in summary["jobs"] if job["status"] == "ok"}
    assert ok <= {str(out) for out in written}

    resumed = batch(pooled, workers=1, cache_dir=tmp_path / "c2", progress=False)
    assert resumed.ok and sum(job.status == "up to date" for job in resumed.jobs) == len(written)
    for spec in jobs:
        assert adapter_bytes(tmp_path / spec["out"]) == adapter_bytes(tmp_path / ("pool-" + spec["out"]))


def test_ray_outputs_equal_the_single_process_run(bases, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    defaults, jobs = three_jobs(bases)
    local = write_manifest(tmp_path / "local.yaml", defaults, jobs)
    remote = write_manifest(tmp_path / "ray.yaml", defaults, [dict(spec, out="ray-" + spec["out"]) for spec in jobs])
    assert batch(local, workers=1, cache_dir=tmp_path / "c1", progress=False).ok
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = batch(remote, ray=RayOptions(), cache_dir=tmp_path / "c2", progress=False)
    finally:
        ray.shutdown()
    assert result.ok and result.summary["executor"]["kind"] == "ray"
    assert result.summary["subspaces"]["computed"] == result.summary["subspaces"]["distinct"]
    assert all(job.cache_misses == 0 for job in result.jobs)
    for spec in jobs:
        assert adapter_bytes(tmp_path / spec["out"]) == adapter_bytes(tmp_path / ("ray-" + spec["out"]))


# -- sizing and partitioning ------------------------------------------------------------------------


def test_pool_size_is_bounded_by_cores_memory_and_jobs(monkeypatch) -> None:
    import loraport.batching.pools as pools

    monkeypatch.setattr(pools, "usable_cores", lambda: 8)
    monkeypatch.setattr(pools, "available_memory_mb", lambda: 2000.0)
    size = size_local_pool(jobs=10, threads=1, job_memory_mb=600)
    assert (size.workers, size.chosen_by) == (2, "bounded by memory")  # 2000 * 0.85 // 600
    assert size.peak_bound_mb == 1200 and "peak about 1200 MB" in size.describe()
    assert size_local_pool(jobs=10, threads=2, job_memory_mb=100).workers == 4  # cores / threads
    assert size_local_pool(jobs=3, threads=1, job_memory_mb=100).workers == 3
    assert size_local_pool(jobs=10, threads=1, job_memory_mb=5000).workers == 1  # never zero
    assert size_local_pool(jobs=10, threads=1, job_memory_mb=100, workers=5).chosen_by == "--workers"


def test_subspace_tasks_cover_each_planned_subspace_once(bases, tmp_path: Path) -> None:
    defaults, jobs = three_jobs(bases)
    loaded, problems, _ = load_jobs(write_manifest(tmp_path / "p.yaml", defaults, jobs), tmp_path / "cache")
    plan = plan_batch(loaded, tmp_path / "cache")
    assert problems == [] and plan.problems == [] and len(plan.pending) == 3
    for parallel in (1, 2, 5):
        tasks = subspace_tasks(plan, tmp_path / "cache", parallel)
        requests = [(task.base, request) for task in tasks for request in task.requests]
        assert len(requests) == len(set(requests)) == plan.distinct_subspaces
        assert len(tasks) <= 4 * parallel + len(plan.groups)
        assert [task.cost for task in tasks] == sorted((task.cost for task in tasks), reverse=True)
