"""The side-effect bound (``--distill-keep-bound``): watched lines, the keep weight's rise, no change where loose."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraport import transfer
from loraport.distill.bound import MAX_KEEP_SCALE, SIDE_EFFECT_MARGIN, KeepBound, adapter_limit
from loraport.distill.generic import generic_lines, watch_lines
from tests.helpers import demo_source_and_copy, dense_updates, fast_distill

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo zoo's S, a perturbed copy D (the student starts from zero on it), a LoRA on S and prompts."""
    from loraport.zoo import demo_dir
    from loraport.zoo.corpus import write_lines
    from loraport.zoo.tiny import make_random_adapter

    root = tmp_path_factory.mktemp("bound")
    zoo = demo_dir()
    S, D = demo_source_and_copy(root)
    lines = [line.strip() for line in (zoo / "calibration.txt").read_text().splitlines() if line.strip()]
    prompts = [" ".join(line.split()[: max(3, len(line.split()) // 2)]) for line in lines[:60]]
    return {
        "S": S,
        "D": D,
        "lora": make_random_adapter(S, root / "lora", r=4, alpha=32, seed=3),
        "prompts": write_lines(root / "prompts.txt", prompts),
    }


def _port(pair: dict[str, Path], out: Path, **extra: object):  # type: ignore[no-untyped-def]
    return transfer(
        pair["lora"], pair["S"], pair["D"], out, prompts=str(pair["prompts"]), init="zero", distill_steps=20,
        distill_lr=5e-3, distill_force=True, **fast_distill(out.parent / f"{out.name}-cache", **extra),
    )  # fmt: skip


def test_watched_lines_are_apart_from_the_kept_and_the_reported_ones(tmp_path: Path) -> None:
    keep, measured, _ = generic_lines(None, 8, seed=2)
    kept, watched = watch_lines(None, 8, seed=2)
    assert kept == keep and len(watched) == 4  # the standard-library sets stay as they were
    assert not set(watched) & (set(keep) | set(measured))
    text = tmp_path / "generic.txt"
    text.write_text("\n".join(f"line {i} of generic text" for i in range(100)))
    keep, measured, _ = generic_lines(str(text), 8, seed=0)
    kept, watched = watch_lines(str(text), 8, seed=0)
    assert kept == keep and len(watched) == 4 and not set(watched) & (set(keep) | set(measured))
    text.write_text("\n".join(f"line {i}" for i in range(20)))  # a short file: the watched lines leave the kept
    keep, measured, _ = generic_lines(str(text), 8, seed=0)
    kept, watched = watch_lines(str(text), 8, seed=0)
    assert kept + watched == keep and len(watched) == 2 and not set(watched) & set(measured)


def test_the_keep_weight_doubles_while_over_the_limit_up_to_its_cap() -> None:
    bound = KeepBound([[1, 2]], 1.0, limit=0.10)
    assert bound.next_scale(0.11, 1.0) == 2.0 and bound.next_scale(0.10, 2.0) == 2.0
    assert bound.next_scale(0.5, MAX_KEEP_SCALE) == MAX_KEEP_SCALE
    assert adapter_limit([0.09]) == pytest.approx(0.09 + SIDE_EFFECT_MARGIN)
    assert adapter_limit([-0.2, 0.3]) == pytest.approx(0.3 + SIDE_EFFECT_MARGIN)
    assert adapter_limit([-0.2]) == pytest.approx(SIDE_EFFECT_MARGIN) and adapter_limit([0.1, None]) is None


def test_a_port_over_its_bound_raises_the_keep_weight_and_says_so(pair, tmp_path: Path, monkeypatch) -> None:
    import loraport.distill.bound as bound_module

    monkeypatch.setattr(bound_module, "adapter_limit", lambda owns: -10.0)  # every change (> -100 %) is over it
    over = _port(pair, tmp_path / "over")
    bound = over.report.distill["generic"]["bound"]
    assert bound["raised_at_steps"] == [5, 10, 15, 20] and bound["keep_scale"] == 16.0
    assert len(bound["changes"]) == 4 and bound["watched_lines"] > 0
    assert any("the keep weight rose 16-fold (at steps 5, 10, 15, 20)" in note for note in over.report.notes)
    generic = over.report.distill["generic"]
    assert generic["perplexity_change_stderr"] > 0 and generic["source_perplexity_change_stderr"] > 0
    assert any("lines): the adapter changes its source's by" in n and n.count("(s.e. ") == 2 for n in over.report.notes)
    fixed = _port(pair, tmp_path / "fixed", distill_keep_bound="off")
    assert fixed.report.distill["generic"]["bound"] is None
    over_factors, fixed_factors = dense_updates(tmp_path / "over"), dense_updates(tmp_path / "fixed")
    assert any(not (over_factors[k] == fixed_factors[k]).all() for k in fixed_factors)  # the weight acted


def test_a_loose_bound_changes_nothing(pair, tmp_path: Path, monkeypatch) -> None:
    import loraport.distill.bound as bound_module

    monkeypatch.setattr(bound_module, "adapter_limit", lambda owns: 1e9)
    loose = _port(pair, tmp_path / "loose")
    assert loose.report.distill["generic"]["bound"]["raised_at_steps"] == []
    assert any("the keep weight stayed as set" in note for note in loose.report.notes)
    _port(pair, tmp_path / "off", distill_keep_bound="off")
    loose_factors, off_factors = dense_updates(tmp_path / "loose"), dense_updates(tmp_path / "off")
    assert set(loose_factors) == set(off_factors)
    for name in off_factors:
        assert (loose_factors[name] == off_factors[name]).all(), name


def test_the_perplexity_change_has_a_standard_error_over_the_lines() -> None:
    from math import exp, sqrt

    from loraport.distill.generic import perplexity_change_stderr, pooled_nll

    before = [(20.0, 10), (45.0, 15), (12.0, 4)]
    shifted = [(total + 0.2 * n, n) for total, n in before]  # every line 0.2 nats per token worse
    assert pooled_nll(shifted) - pooled_nll(before) == pytest.approx(0.2)
    assert perplexity_change_stderr(before, shifted) == pytest.approx(0.0, abs=1e-12)
    after = [(22.0, 10), (45.0, 15), (12.0, 4)]  # one line 2 nats worse in all, the others unchanged
    mean = 2.0 / 29
    residuals = [2.0 - mean * 10, -mean * 15, -mean * 4]
    expected = exp(mean) * sqrt(3 / 2 * sum(r * r for r in residuals) / 29**2)
    assert perplexity_change_stderr(before, after) == pytest.approx(expected)
    assert perplexity_change_stderr(before[:1], after[:1]) is None


def test_the_keep_term_can_take_the_targets_whole_vocabulary(pair, tmp_path: Path, monkeypatch) -> None:
    """Across tokenizers the keep term is over the support (the tokens both spell alike) unless asked for the
    target's whole vocabulary; the run differs."""
    import loraport.distill.distiller as distiller
    from loraport.zoo.corpus import CorpusGenerator
    from loraport.zoo.tiny import make_bpe_tokenizer, make_tiny_model

    T = make_tiny_model(
        "gemma3_text", tmp_path / "T", seed=1, hidden=48, layers=2, heads=2, kv_heads=1, intermediate=96,
        head_dim=24, vocab=300, sliding_window=8,
    )  # fmt: skip
    make_bpe_tokenizer(T, CorpusGenerator(11).sentences(160), 300)
    seen: dict[str, object] = {}
    real_keep = distiller.keep_samples

    def spy(student, rows, pad, top_k, device, support=None):  # type: ignore[no-untyped-def]
        seen["support"] = support
        return real_keep(student, rows, pad, top_k, device, support)

    monkeypatch.setattr(distiller, "keep_samples", spy)
    factors = {}
    for vocab in ("support", "full"):
        transfer(
            pair["lora"], pair["S"], T, tmp_path / vocab, prompts=str(pair["prompts"]), distill_steps=10,
            distill_lr=1e-2, distill_force=True, distill_keep_vocab=vocab, **fast_distill(tmp_path / f"{vocab}-c"),
        )  # fmt: skip
        factors[vocab] = dense_updates(tmp_path / vocab)
        assert (seen["support"] is None) == (vocab == "full")
    assert any(not (factors["support"][k] == factors["full"][k]).all() for k in factors["full"])


def test_a_loose_bound_is_watched_at_every_fifth_check_only() -> None:
    from loraport.distill.bound import LOOSE_EVERY
    from loraport.distill.train import Evaluation

    bound = KeepBound([[1, 2]], 1.0, limit=0.20)

    def history(changes: list[float | None]) -> list[Evaluation]:
        return [Evaluation(10 * i, 0.5, 1.0, 0.5, 1.0, None, 0.0, generic_change=c) for i, c in enumerate(changes)]

    assert bound.due(history([None, None]))  # nothing measured yet
    assert bound.due(history([None, 0.15, None]))  # the last one over half the limit
    assert not bound.due(history([None, 0.05, None]))
    assert not bound.due(history([None, 0.05] + [None] * (LOOSE_EVERY - 1)))
    assert bound.due(history([None, 0.05] + [None] * LOOSE_EVERY))
