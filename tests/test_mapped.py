"""Calibrated transfer across models that share no coordinates: alignment, maps, depth pairing, no harm."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from loraport import transfer
from loraport.calibrate.maps import (
    MapMoments,
    OutputAnchor,
    centered_gram,
    fit_map,
    linear_cka,
    map_r2,
    monotone_pairing,
)
from loraport.calibrate.text import align_calibration, align_sample
from loraport.cli import main
from loraport.errors import LoraportError
from loraport.methods.calibrated import Moments, heldout_errors, least_harmful, moments
from tests.helpers import peft_load_and_forward

F64 = torch.float64


# -- token alignment ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A word-level tokenizer (whitespace + punctuation) and a byte-level BPE, built here."""
    from loraport.zoo.corpus import CorpusGenerator, build_tokenizer
    from loraport.zoo.tiny import make_bpe_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    sentences = CorpusGenerator(3).sentences(200)
    bpe_dir = make_bpe_tokenizer(root / "bpe", sentences, 300)
    from transformers import AutoTokenizer

    return {"word": build_tokenizer(), "bpe": AutoTokenizer.from_pretrained(str(bpe_dir)), "text": sentences}


def _word_ends(text: str) -> set[int]:
    """Character offsets where a word or a punctuation mark ends (the word-level tokenizer's token ends)."""
    ends, previous = set(), None
    for i, ch in enumerate(text):
        kind = "space" if ch.isspace() else ("punct" if not ch.isalnum() else "word")
        if previous in ("word", "punct") and (kind != previous or previous == "punct"):
            ends.add(i)
        previous = kind
    if previous in ("word", "punct"):
        ends.add(len(text))
    return ends


def test_alignment_pairs_tokens_ending_at_the_same_character(tokenizers) -> None:
    word, bpe = tokenizers["word"], tokenizers["bpe"]
    for text in tokenizers["text"][:30]:
        sample = align_sample(text, word, bpe, 128)
        ends_w = [e for _, e in word(text, return_offsets_mapping=True)["offset_mapping"]]
        ends_b = [e for _, e in bpe(text, return_offsets_mapping=True)["offset_mapping"]]
        # Known alignment: every word end that the BPE also ends a token at, and nothing else.
        expected = sorted(_word_ends(text) & set(ends_b))
        assert sorted(ends_w[i] for i, _ in sample.pairs) == expected
        assert all(ends_w[i] == ends_b[j] for i, j in sample.pairs)
        assert [i for i, _ in sample.pairs] == sorted(i for i, _ in sample.pairs)
        assert [j for _, j in sample.pairs] == sorted(j for _, j in sample.pairs)


def test_same_tokenizer_aligns_every_position(tokenizers) -> None:
    bpe = tokenizers["bpe"]
    samples, share = align_calibration(tokenizers["text"][:20], bpe, bpe, 20, 64, "text")
    assert share == 1.0
    for sample in samples:
        assert sample.pairs == [(i, i) for i in range(len(sample.target_ids))]


def test_text_with_few_aligned_positions_is_a_clear_error(tokenizers) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A character-level tokenizer ends a token at every character: only word ends align with the words.
    chars = sorted(set("".join(tokenizers["text"])) | {"[UNK]"})
    core = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    char_level = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    _, share = align_calibration(tokenizers["text"][:20], tokenizers["word"], char_level, 20, 256, "text", 0.0)
    assert 0.1 < share < 0.4
    with pytest.raises(LoraportError, match=r"end at the same character in both tokenizers"):
        align_calibration(tokenizers["text"][:20], tokenizers["word"], char_level, 20, 256, "text", 0.5)


# -- maps and depth pairing ----------------------------------------------------------------------


def _data(T: int = 400, d_s: int = 6, d_t: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, d_s, generator=g, dtype=F64) @ torch.randn(d_s, d_s, generator=g, dtype=F64) + 3.0
    M = torch.randn(d_t, d_s, generator=g, dtype=F64)
    Y = X @ M.mT + 0.3 * torch.randn(T, d_t, generator=g, dtype=F64) - 1.0
    return X, Y


def _moments(X: torch.Tensor, Y: torch.Tensor, chunks: int = 4) -> MapMoments:
    total = MapMoments.zeros(X.shape[1], Y.shape[1])
    for x, y in zip(X.chunk(chunks), Y.chunk(chunks), strict=True):
        part = MapMoments.zeros(X.shape[1], Y.shape[1])
        part.add(x, y)
        total = total + part
    return total


def test_ridge_map_matches_a_float64_reference() -> None:
    X, Y = _data()
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Cxx, Cyx = Xc.mT @ Xc / len(X), Yc.mT @ Xc / len(X)
    mu = 0.05 * float(torch.diagonal(Cxx).mean())
    reference = Cyx @ torch.linalg.inv(Cxx + mu * torch.eye(X.shape[1], dtype=F64))
    M = fit_map(_moments(X, Y), "ridge", 0.05)
    torch.testing.assert_close(M, reference, rtol=1e-4, atol=1e-5)
    # R^2 from moments equals the dense computation on the same data.
    r2 = 1 - float((Yc - Xc @ M.mT).square().sum() / Yc.square().sum())
    assert map_r2(M, _moments(X, Y)) == pytest.approx(r2, abs=1e-5)
    assert r2 > 0.9


def test_orthogonal_and_cca_maps() -> None:
    X, Y = _data(d_s=5, d_t=5)
    M = fit_map(_moments(X, Y), "orthogonal")
    Q = M / torch.linalg.matrix_norm(M, ord=2)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(5, dtype=F64), atol=1e-6, rtol=0)
    # A pure rotation and scale is recovered exactly.
    R = torch.linalg.qr(torch.randn(5, 5, dtype=F64, generator=torch.Generator().manual_seed(1)))[0]
    Xc = X - X.mean(0)
    torch.testing.assert_close(fit_map(_moments(X, 2.5 * Xc @ R.mT), "orthogonal"), 2.5 * R, atol=1e-6, rtol=1e-6)
    # CCA with every correlation kept and no ridge is ordinary least squares.
    X, Y = _data()
    cca = fit_map(_moments(X, Y), "cca", ridge=0.0)
    ols = fit_map(_moments(X, Y), "ridge", ridge=0.0)
    torch.testing.assert_close(cca, ols, rtol=1e-4, atol=1e-6)


def test_anchored_map_solves_its_normal_equations() -> None:
    X, Y = _data()
    g = torch.Generator().manual_seed(3)
    P, Q = torch.randn(40, 5, generator=g, dtype=F64), torch.randn(40, 6, generator=g, dtype=F64)
    anchor = OutputAnchor.from_heads(P, Q)
    stats = _moments(X, Y)
    M = fit_map(stats, "ridge", 0.01, anchor, anchor_weight=2.0, rms_ratio=1.5)
    Cxx, Cyx, _ = stats.centered()
    mu = 0.01 * float(torch.diagonal(Cxx).mean())
    w = 2.0 * float(torch.diagonal(Cxx).mean()) / float(torch.diagonal(P.mT @ P).mean())
    residual = M @ (Cxx + mu * torch.eye(6, dtype=F64)) + w * (P.mT @ P) @ M - Cyx - w * 1.5 * P.mT @ Q
    assert float(residual.abs().max()) < 1e-6 * float(Cyx.abs().max())
    # A large weight makes P M ~ 1.5 Q in the least-squares sense.
    heavy = fit_map(stats, "ridge", 0.01, anchor, anchor_weight=1e8, rms_ratio=1.5)
    torch.testing.assert_close(heavy, torch.linalg.lstsq(P, 1.5 * Q).solution, rtol=1e-3, atol=1e-4)


def test_cka_and_monotone_pairing() -> None:
    X, _ = _data()
    K = centered_gram(X)
    assert linear_cka(K, K) == pytest.approx(1.0)
    assert linear_cka(K, centered_gram(X @ torch.linalg.qr(torch.randn(6, 6, dtype=F64))[0] * 3)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(5)
    for L_s, L_t in ((5, 3), (3, 5), (4, 4)):
        S = torch.rand(L_s, L_t, generator=g, dtype=F64)
        pairing = monotone_pairing(S)
        assert pairing[L_t - 1] == L_s - 1 and all(pairing[j] <= pairing[j + 1] for j in range(L_t - 1))
        best = max(
            (c for c in itertools.product(range(L_s), repeat=L_t) if list(c) == sorted(c) and c[-1] == L_s - 1),
            key=lambda c: sum(float(S[i, j]) for j, i in enumerate(c)),
        )
        assert tuple(pairing[j] for j in range(L_t)) == best


# -- no harm --------------------------------------------------------------------------------------


def test_no_harm_leaves_out_a_port_that_makes_held_out_fit_worse() -> None:
    g = torch.Generator().manual_seed(7)
    m, n, r, T = 6, 8, 2, 300
    B, A = torch.randn(m, r, generator=g, dtype=F64), torch.randn(r, n, generator=g, dtype=F64)
    X = torch.randn(n, T, generator=g, dtype=F64)
    # Fold 0's teacher pushes the outputs one way, fold 1's the opposite way: whatever is fitted on
    # one fold is worse than nothing on the other.
    folds = [moments(A, X, X, extra=(B @ A @ X)), moments(A, X, X, extra=-(B @ A @ X))]
    no_B = torch.zeros(m, 0, dtype=F64)
    for fold in folds:
        fold.cross, fold.code_gram, fold.target_code = fold.cross[:0], fold.code_gram[:0, :0], fold.target_code[:0]

    def port(train: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        from loraport.methods.calibrated import calibrated_update

        f = calibrated_update(no_B, torch.zeros(0, n, dtype=F64), no_B, torch.zeros(0, n, dtype=F64), train, 0.01, r,
                              extra_weight=1.0)  # fmt: skip
        return f.B, f.A

    errors = heldout_errors(folds, {"port": port}, no_B, extra_weight=1.0)
    assert errors["none"] == 1.0 and errors["port"] > 1.0
    assert least_harmful(errors) == "none"
    # Consistent folds: the port wins.
    same = [moments(A, X, X, extra=(B @ A @ X)) for _ in range(2)]
    for fold in same:
        fold.cross, fold.code_gram, fold.target_code = fold.cross[:0], fold.code_gram[:0, :0], fold.target_code[:0]
    errors = heldout_errors(same, {"port": port}, no_B, extra_weight=1.0)
    assert errors["port"] < 0.01 and least_harmful(errors) == "port"


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama with the zoo's word-level tokenizer and a tiny Gemma-3 with a byte-level BPE."""
    from loraport.zoo.corpus import CorpusGenerator, build_tokenizer, vocabulary, write_lines
    from loraport.zoo.tiny import make_bpe_tokenizer, make_random_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("mapped")
    sentences = CorpusGenerator(4).sentences(120)
    S = make_tiny_model("llama", root / "S", seed=0, layers=3, vocab=len(vocabulary()))
    build_tokenizer().save_pretrained(str(S))
    T = make_tiny_model(
        "gemma3_text", root / "T", seed=1, hidden=48, layers=2, heads=2, kv_heads=1, intermediate=96, head_dim=24,
        vocab=300, sliding_window=8,
    )  # fmt: skip
    make_bpe_tokenizer(T, sentences, 300)
    return {
        "S": S,
        "T": T,
        "lora": make_random_adapter(S, root / "lora", r=4),
        "text": write_lines(root / "calib.txt", sentences[:60]),
    }


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_other_tokenizer_width_depth_ports_to_residual_writers(pair, tmp_path) -> None:
    out = tmp_path / "out"
    result = transfer(
        pair["lora"], pair["S"], pair["T"], out, method="calibrated", calibration=str(pair["text"]), progress=False,
        no_harm=False,
    )  # fmt: skip
    report = result.report
    assert any("different tokenizers" in n for n in report.notes)
    stats = report.calibration
    assert stats["mode"] == "mapped" and 0.2 < stats["aligned_share"] <= 1.0  # word ends of a 300-token BPE
    assert [layer["target"] for layer in stats["layers"]] == [0, 1] and stats["layers"][-1]["source"] == 2
    assert all(-1.0 < layer["map_r2"] <= 1.0 for layer in stats["layers"])
    written = {r.target_module.rsplit(".", 1)[-1] for r in report.records if r.decision == "transferred"}
    assert written == {"o_proj", "down_proj"}
    assert all(r.fit_after < 1.0 for r in report.records if r.decision == "transferred")
    assert peft_load_and_forward(pair["T"], out) > 0
    saved = json.loads((out / "loraport_report.json").read_text())
    assert saved["calibration"]["aligned_positions"] > 0


def test_no_harm_and_cli_flags_in_mapped_mode(pair, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    code = main(
        ["transfer", "--adapter", str(pair["lora"]), "--source-base", str(pair["S"]), "--target-base", str(pair["T"]),
         "--out", str(out), "--method", "calibrated", "--calibration", str(pair["text"]), "--calib-depth", "relative",
         "--calib-map", "orthogonal", "--calib-writers", "down", "--report", str(tmp_path / "r.json"), "--quiet"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    if code == 2:  # no-harm left out every writer: said so, nothing written
        assert all(m["decision"] == "skipped" and "no-harm" in m["reason"] for m in report["modules"])
        assert not out.exists()
        return
    assert code == 0 and "mapped:" in printed
    assert report["calibration"]["depth"] == "relative" and report["calibration"]["map"] == "orthogonal"
    writers = [m for m in report["modules"] if m["role"]]
    assert writers and all(m["target_module"].endswith("down_proj") for m in writers)
    for m in writers:
        assert m["heldout"]["none"] == 1.0
        assert (m["decision"] == "transferred") == (m["heldout"]["port"] < 1.0)


@pytest.fixture(scope="module")
def same_shape(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama S, a close derivative D and an independently initialised I of the same shape."""
    from loraport.zoo.corpus import CorpusGenerator, build_tokenizer, vocabulary, write_lines
    from loraport.zoo.tiny import make_random_adapter, make_tiny_model, perturb_model

    root = tmp_path_factory.mktemp("same-shape")
    vocab = len(vocabulary())
    paths = {
        "S": make_tiny_model("llama", root / "S", seed=0, layers=2, vocab=vocab),
        "I": make_tiny_model("llama", root / "I", seed=9, layers=2, vocab=vocab),
    }
    paths["D"] = perturb_model(paths["S"], root / "D", 0.1)
    for name in ("S", "D", "I"):
        build_tokenizer().save_pretrained(str(paths[name]))
    paths["lora"] = make_random_adapter(paths["S"], root / "lora", r=4)
    paths["text"] = write_lines(root / "calib.txt", CorpusGenerator(6).sentences(40))
    return paths


def test_same_base_with_default_options_returns_the_source_adapter(same_shape, tmp_path) -> None:
    from tests.helpers import dense_updates

    result = transfer(
        same_shape["lora"], same_shape["S"], same_shape["S"], tmp_path / "out", method="calibrated",
        calibration=str(same_shape["text"]), progress=False,
    )  # fmt: skip
    assert any(n.startswith("calibration mode shared") for n in result.report.notes)
    assert all(r.decision == "transferred" for r in result.report.records)
    source, ported = dense_updates(same_shape["lora"]), dense_updates(tmp_path / "out")
    assert set(source) == set(ported)
    for name in source:
        torch.testing.assert_close(ported[name], source[name], rtol=1e-3, atol=1e-4 * float(source[name].abs().max()))


def test_auto_mode_and_the_independence_warning(same_shape) -> None:
    from loraport.adapters import load_adapter
    from loraport.calibrate import CalibrationOptions, choose_mode
    from loraport.checkpoints import Checkpoint
    from loraport.pairing import Pairing

    adapter = load_adapter(same_shape["lora"])
    options = CalibrationOptions(str(same_shape["text"]))
    derivative = Pairing(adapter, Checkpoint.open(same_shape["S"]), Checkpoint.open(same_shape["D"]))
    independent = Pairing(adapter, Checkpoint.open(same_shape["S"]), Checkpoint.open(same_shape["I"]))
    mode, notes = choose_mode(options, derivative)
    assert mode == "shared" and not any(n.startswith("WARNING") for n in notes)
    mode, notes = choose_mode(options, independent)
    assert mode == "shared" and any(n.startswith("WARNING") and "independently trained" in n for n in notes)
    options.mode = "mapped"
    assert choose_mode(options, independent)[0] == "mapped"


# -- the effect check: harm judged on the target's next-token predictions ------------------------


def test_effect_error_is_zero_for_the_adapters_own_effect_and_one_for_nothing() -> None:
    from loraport.calibrate.effect import EffectProbe

    g = torch.Generator().manual_seed(2)
    base = torch.log_softmax(torch.randn(7, 30, generator=g, dtype=F64), -1)
    teacher = torch.log_softmax(base + torch.randn(7, 30, generator=g, dtype=F64), -1)
    top = torch.topk(teacher, 10, dim=1)
    weight = torch.softmax(top.values, 1)
    delta = top.values - base.gather(1, top.indices)
    delta = delta - torch.sum(weight * delta, 1, keepdim=True)
    probe = EffectProbe([], [], None, top.indices, weight, delta)
    assert probe.error(teacher, base) == pytest.approx(0.0, abs=1e-12)
    assert probe.error(base, base) == pytest.approx(1.0)
    # A renormalisation (a constant per position) is no effect; half the effect leaves a quarter of the error.
    assert probe.error(teacher + 3.0, base) == pytest.approx(0.0, abs=1e-12)
    assert probe.error(base + 0.5 * (teacher - base), base) == pytest.approx(0.25)


def test_mapped_port_that_reproduces_the_effect_is_kept(tmp_path) -> None:
    """The demo zoo's trained S -> D15 with its trained LoRA, forced through the mapped mode: the port
    reproduces most of the adapter's effect on held-out lines, and every layer is kept."""
    from loraport.zoo import demo_dir

    zoo = demo_dir()
    result = transfer(
        zoo / "loras" / "S-facts", zoo / "models" / "S", zoo / "models" / "D15", tmp_path / "out",
        method="calibrated", calibration=str(zoo / "calibration.txt"), calib_mode="mapped", calib_samples=96,
        progress=False,
    )  # fmt: skip
    check = result.report.calibration["effect_check"]
    assert check["lines"] >= 4 and check["positions"] > 0 and check["layers_left_out"] == []
    assert check["error_written"] is not None and check["error_written"] < 0.5
    assert all(value > check["error_all_layers"] for value in check["error_without_layer"].values())
    assert result.output is not None and result.report.output_modules > 0


def test_mapped_port_no_better_than_nothing_writes_nothing_and_points_to_distill(pair, tmp_path) -> None:
    with pytest.raises(LoraportError, match="use --method distill") as caught:
        transfer(
            pair["lora"], pair["S"], pair["T"], tmp_path / "out", method="calibrated",
            calibration=str(pair["text"]), calib_depth="relative", calib_map="orthogonal", calib_writers="down",
            progress=False, report_path=tmp_path / "r.json",
        )  # fmt: skip
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["modules"] and all("no-harm" in m["reason"] for m in report["modules"])
    assert any(n.startswith("WARNING: the calibrated (mapped) port does not reproduce") for n in report["notes"])
