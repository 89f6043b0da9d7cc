"""The commands the benchmarks write into their result files run from a fresh clone: relative paths only."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from .helpers import benchmark_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fusion_real() -> Iterator[ModuleType]:
    yield from benchmark_script("fusion_real")


def test_fusion_real_commands_name_paths_from_the_repository_root(fusion_real: ModuleType) -> None:
    real = ROOT / "benchmarks" / "work" / "real"
    argv = ["--real", str(real), f"--work={ROOT / 'benchmarks' / 'work' / 'fr'}", "--merges", "facts+bins", "all four"]
    command = fusion_real.command_line(argv)
    assert command == (
        "python benchmarks/fusion_real.py --real benchmarks/work/real --work=benchmarks/work/fr "
        "--merges facts+bins 'all four'"
    )
    assert shlex.split(command)[2:] == ["--real", "benchmarks/work/real", "--work=benchmarks/work/fr",
                                        "--merges", "facts+bins", "all four"]  # fmt: skip


def test_fusion_real_commands_put_the_default_for_a_path_outside_the_repository(
    fusion_real: ModuleType, tmp_path: Path
) -> None:
    argv = ["--real", str(tmp_path / "real"), "--work", "/elsewhere/fusion_real", "--results", str(tmp_path / "r.md")]
    assert fusion_real.command_line([*argv, "--parts", "image"]) == (
        "python benchmarks/fusion_real.py --real benchmarks/work/real --work benchmarks/work/fusion_real "
        "--results benchmarks/results/fusion_real.md --parts image"
    )


def test_fusion_real_rewrites_the_absolute_commands_older_caches_hold(fusion_real: ModuleType) -> None:
    """``--report-only`` renders the commands cached by earlier runs, written before paths were made relative."""
    cached = (
        f"python benchmarks/fusion_real.py --real {ROOT}/benchmarks/work/real --work /work/wt/benchmarks/work/fr "
        "--parts image --no-build --results /tmp/fr/fr3.md"
    )
    assert fusion_real.clone_command(cached) == (
        "python benchmarks/fusion_real.py --real benchmarks/work/real --work benchmarks/work/fusion_real "
        "--parts image --no-build --results benchmarks/results/fusion_real.md"
    )


def test_fusion_real_keeps_the_committed_rows_a_fresh_work_directory_lacks(fusion_real: ModuleType) -> None:
    """A rerun in a fresh clone scores only new rows: the committed rows, references and commands stay."""
    row = {"merge": "all four", "row": "TSV", "kind": "ours", "eval": {"json": {"gain_kept": 0.03, "se": 0.01}}}
    committed = {
        "image": {"rows": {"x": 1}},
        "lora-16-80": {"rows": {"all four|TSV": row}, "references": {"json|eval": {"base": 0.0, "specialist": 0.98}},
                       "relative_update": {"json": 0.017}, "commands": ["python old"]},
    }  # fmt: skip
    new = {**row, "row": "distill", "kind": "distill"}
    results = {
        "lora-16-80": {"rows": {"all four|distill": new},
                       "references": {"json|eval": {"base": 0.5, "specialist": 0.99}},
                       "relative_update": {}, "commands": ["python new"]},
        "assets": {},
    }  # fmt: skip
    merged = fusion_real.with_committed(results, committed)
    assert merged["image"] == {"rows": {"x": 1}}
    assert set(merged["lora-16-80"]["rows"]) == {"all four|TSV", "all four|distill"}
    assert merged["lora-16-80"]["references"]["json|eval"] == {"base": 0.5, "specialist": 0.99}  # this run's
    # the committed row fused a json LoRA whose own accuracy has changed since (rebuilt): marked
    assert merged["lora-16-80"]["rows"]["all four|TSV"]["earlier_build"] == {"json": (0.98, 0.99)}
    assert "earlier_build" not in merged["lora-16-80"]["rows"]["all four|distill"]
    assert merged["lora-16-80"]["relative_update"] == {"json": 0.017}
    assert merged["lora-16-80"]["commands"] == ["python old", "python new"]


def test_fusion_real_reports_a_distilled_fusion_beside_the_weight_space_rows() -> None:
    """The distill row is its own column and section; the weight-space verdicts stay as they were."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fusion_real_report import markdown

    def row(name: str, kind: str, json_kept: float, **extra: object) -> dict:
        kept = {"facts": {"gain_kept": 0.95, "se": 0.02}, "json": {"gain_kept": json_kept, "se": 0.05}}
        return {"merge": "facts+json", "row": name, "kind": kind, "scaling": 1.0, "eval": kept, "fuse_seconds": 9.0,
                "rank": 32, "params": 1000, **extra}  # fmt: skip

    details = {"chosen": "distilled", "agreement": {"facts": [0.4, 0.9], "json": [0.1, 0.95]},
               "generic": {"perplexity_change": 0.12, "source_perplexity_changes": {"a": 0.3, "b": 0.2}},
               "student": {"steps": 80, "stopped": "saturated"}, "peak_rss_mb": 2100.0}  # fmt: skip
    rows = {"a": row("TSV", "ours", 0.19), "b": row("PEFT cat", "peft", 0.04),
            "c": row("distill", "distill", 0.92, details=details)}  # fmt: skip
    part = {"rows": rows, "references": {}, "sizes": {"dev": 12, "eval": 48}}
    text = markdown({"lora-12-48": part})
    assert "| facts+json | 12/48 | TSV (19) | PEFT cat (4) | yes | 92 |" in text
    assert "| facts+json | distill | facts 95 ± 2, json 92 ± 5 | 92 | TSV 19 |" in text
    assert "json 0.10 -> 0.95" in text and "+12% (+30%, +20%)" in text and "80 (saturated)" in text
    assert "worst task per merge facts+json: 92: met" in text
