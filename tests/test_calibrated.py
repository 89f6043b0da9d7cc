"""Calibrated transfer: the ridge math against float64 dense references, the layer-by-layer
streaming against a plain full forward pass, end-to-end ports and bad calibration input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraport import LoraportError, load_adapter, transfer
from loraport.calibrate import CalibrationOptions, Calibrator
from loraport.checkpoints import Checkpoint
from loraport.cli import main
from loraport.methods.calibrated import (
    calibrated_update,
    dense_reference,
    fit_error,
    moments,
    relative_fit_error,
    ridge_lambda,
)
from loraport.pairing import Pairing
from loraport.report import TransferReport

from .helpers import dense_updates, peft_load_and_forward

F64 = torch.float64
STAGE0 = ("attn.q", "attn.k", "attn.v")


# -- the math -------------------------------------------------------------------------------


def _problem(seed: int = 0, m: int = 9, n_s: int = 11, n_t: int = 11, r: int = 3, T: int = 300):
    g = torch.Generator().manual_seed(seed)
    B_s, A_s = torch.randn(m, r, generator=g, dtype=F64), torch.randn(r, n_s, generator=g, dtype=F64)
    B_0, A_0 = torch.randn(m, r, generator=g, dtype=F64), torch.randn(r, n_t, generator=g, dtype=F64)
    # Anisotropic, correlated inputs, as real activations are.
    X_s = torch.randn(n_s, n_s, generator=g, dtype=F64) @ torch.randn(n_s, T, generator=g, dtype=F64)
    mix = torch.randn(n_t, n_s, generator=g, dtype=F64)
    X_t = mix @ X_s + 0.5 * torch.randn(n_t, T, generator=g, dtype=F64)
    return B_s, A_s, B_0, A_0, X_s, X_t


def _objective(dW, dW_s, dW_0, X_s, X_t, lam):
    lam_prime = ridge_lambda(X_t @ X_t.T, lam)
    return float(((dW @ X_t - dW_s @ X_s) ** 2).sum() + lam_prime * ((dW - dW_0) ** 2).sum())


@pytest.mark.parametrize("lam", [0.01, 1.0, 10.0])
def test_full_rank_solution_matches_dense_formula(lam: float) -> None:
    B_s, A_s, B_0, A_0, X_s, X_t = _problem(n_t=13)
    f = calibrated_update(B_s, A_s, B_0, A_0, moments(A_s, X_s, X_t), lam, rank=6)  # 2r: nothing truncated
    expected = dense_reference(B_s @ A_s, B_0 @ A_0, X_s, X_t, lam)
    torch.testing.assert_close(f.B @ f.A, expected, rtol=1e-8, atol=1e-10)
    assert f.lam_prime == pytest.approx(lam * float(torch.diagonal(X_t @ X_t.T).mean()))


def test_reduced_rank_is_the_weighted_truncation_and_beats_plain_svd() -> None:
    B_s, A_s, B_0, A_0, X_s, X_t = _problem(seed=1)
    lam, r = 0.3, 3
    stats = moments(A_s, X_s, X_t)
    rrr = calibrated_update(B_s, A_s, B_0, A_0, stats, lam, rank=r, truncation="rrr")
    svd = calibrated_update(B_s, A_s, B_0, A_0, stats, lam, rank=r, truncation="svd")
    full = dense_reference(B_s @ A_s, B_0 @ A_0, X_s, X_t, lam)
    # Dense reference of reduced-rank ridge: truncate full @ H^{1/2} in Frobenius norm, map back.
    H = X_t @ X_t.T + ridge_lambda(X_t @ X_t.T, lam) * torch.eye(X_t.shape[0], dtype=F64)
    evals, evecs = torch.linalg.eigh(H)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    U, S, Vh = torch.linalg.svd(full @ root)
    expected_rrr = U[:, :r] @ U[:, :r].T @ full
    torch.testing.assert_close(rrr.B @ rrr.A, expected_rrr, rtol=1e-7, atol=1e-9)
    U, S, Vh = torch.linalg.svd(full)
    torch.testing.assert_close(svd.B @ svd.A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], rtol=1e-7, atol=1e-9)
    assert rrr.B.shape[1] <= r and svd.B.shape[1] <= r
    dW_s, dW_0 = B_s @ A_s, B_0 @ A_0
    assert (
        _objective(rrr.B @ rrr.A, dW_s, dW_0, X_s, X_t, lam)
        <= _objective(svd.B @ svd.A, dW_s, dW_0, X_s, X_t, lam) + 1e-9
    )


def test_same_inputs_return_the_source_update_for_any_ridge() -> None:
    B_s, A_s, _, _, X_s, _ = _problem(seed=2)
    stats = moments(A_s, X_s, X_s)
    for lam in (0.0, 0.1, 10.0):
        f = calibrated_update(B_s, A_s, B_s, A_s, stats, lam, rank=3)
        torch.testing.assert_close(f.B @ f.A, B_s @ A_s, rtol=1e-8, atol=1e-9)
        assert relative_fit_error(f.B, f.A, B_s, stats) < 1e-12


def test_infinite_ridge_returns_the_init() -> None:
    B_s, A_s, B_0, A_0, X_s, X_t = _problem(seed=3)
    stats = moments(A_s, X_s, X_t)
    exact = calibrated_update(B_s, A_s, B_0, A_0, stats, float("inf"), rank=3)
    torch.testing.assert_close(exact.B @ exact.A, B_0 @ A_0, rtol=1e-10, atol=1e-10)
    large = calibrated_update(B_s, A_s, B_0, A_0, stats, 1e9, rank=3)
    torch.testing.assert_close(large.B @ large.A, B_0 @ A_0, rtol=1e-6, atol=1e-6)


def test_different_input_widths_and_fit_error_from_moments() -> None:
    B_s, A_s, B_0, A_0, X_s, X_t = _problem(seed=4, n_s=7, n_t=12)
    stats = moments(A_s, X_s, X_t)
    f = calibrated_update(B_s, A_s, B_0, A_0, stats, 0.5, rank=6)
    torch.testing.assert_close(f.B @ f.A, dense_reference(B_s @ A_s, B_0 @ A_0, X_s, X_t, 0.5), rtol=1e-8, atol=1e-9)
    error, target = fit_error(f.B, f.A, B_s, stats)
    Y = B_s @ A_s @ X_s
    assert error == pytest.approx(float(((f.B @ f.A @ X_t - Y) ** 2).sum()), rel=1e-8)
    assert target == pytest.approx(float((Y**2).sum()), rel=1e-10)


def test_output_matching_matches_dense_formula() -> None:
    B_s, A_s, B_0, A_0, X_s, X_t = _problem(seed=5)
    g = torch.Generator().manual_seed(9)
    extra = torch.randn(B_s.shape[0], X_t.shape[1], generator=g, dtype=F64)
    stats = moments(A_s, X_s, X_t, extra)
    scale, beta, lam = 2.0, 0.7, 0.2
    f = calibrated_update(B_s, A_s, B_0, A_0, stats, lam, rank=9, scale=scale, extra_weight=beta)
    # In dW = s B A units: target s B_s A_s X_s + beta * extra.
    Y = scale * B_s @ A_s @ X_s + beta * extra
    G = X_t @ X_t.T
    lp = ridge_lambda(G, lam)
    expected = (Y @ X_t.T + lp * scale * B_0 @ A_0) @ torch.linalg.inv(G + lp * torch.eye(G.shape[0], dtype=F64))
    torch.testing.assert_close(scale * f.B @ f.A, expected, rtol=1e-8, atol=1e-9)
    error, target = fit_error(f.B, f.A, B_s, stats, scale=scale, extra_weight=beta)
    assert error * scale**2 == pytest.approx(float(((scale * f.B @ f.A @ X_t - Y) ** 2).sum()), rel=1e-7)
    assert target * scale**2 == pytest.approx(float((Y**2).sum()), rel=1e-10)


@pytest.mark.parametrize("truncation", ["rrr", "svd"])
def test_output_matching_truncation_matches_dense_reference(truncation: str) -> None:
    B_s, A_s, B_0, A_0, X_s, X_t = _problem(seed=6, m=9, n_t=14)
    g = torch.Generator().manual_seed(3)
    extra = torch.randn(B_s.shape[0], X_t.shape[1], generator=g, dtype=F64)
    stats = moments(A_s, X_s, X_t, extra)
    f = calibrated_update(B_s, A_s, B_0, A_0, stats, 0.1, rank=4, truncation=truncation, extra_weight=1.0)
    full = calibrated_update(B_s, A_s, B_0, A_0, stats, 0.1, rank=9, extra_weight=1.0)
    W = full.B @ full.A
    G = X_t @ X_t.T
    H = G + ridge_lambda(G, 0.1) * torch.eye(G.shape[0], dtype=F64)
    evals, evecs = torch.linalg.eigh(H)
    weight = evecs @ torch.diag(evals.sqrt()) @ evecs.T if truncation == "rrr" else torch.eye(G.shape[0], dtype=F64)
    U = torch.linalg.svd(W @ weight).U[:, :4]
    torch.testing.assert_close(f.B @ f.A, U @ U.T @ W, rtol=1e-7, atol=1e-9)
    assert f.B.shape[1] == 4


# -- tiny models with a shared tokenizer ----------------------------------------------------


@pytest.fixture(scope="module")
def cal(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama S, a derivative D, a Gemma-2 G and a Qwen-2 Q (same tokenizer), LoRAs, text files."""
    from loraport.zoo.corpus import CorpusGenerator, build_tokenizer, vocabulary, write_lines
    from loraport.zoo.tiny import make_random_adapter, make_tiny_model, perturb_model

    root = tmp_path_factory.mktemp("calibrated")
    vocab = len(vocabulary())
    tok = build_tokenizer()
    paths = {
        "S": make_tiny_model("llama", root / "S", seed=0, layers=3, vocab=vocab),
        "G": make_tiny_model(
            "gemma2",
            root / "G",
            seed=1,
            hidden=48,
            layers=2,
            heads=2,
            kv_heads=1,
            intermediate=96,
            head_dim=24,
            vocab=vocab,
            sliding_window=4,
        ),
        "Q": make_tiny_model("qwen2", root / "Q", seed=2, hidden=48, layers=2, heads=4, kv_heads=2, vocab=vocab),
    }
    # Gemma-3: q/k norms, sliding and full layers with their own rotary bases, tied embeddings.
    paths["G3"] = make_tiny_model(
        "gemma3_text",
        root / "G3",
        seed=5,
        hidden=48,
        layers=3,
        heads=2,
        kv_heads=1,
        intermediate=96,
        head_dim=24,
        vocab=vocab,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    paths["P"] = make_tiny_model("phi3", root / "P", seed=3, layers=2, vocab=vocab)
    paths["T"] = make_tiny_model("gpt2", root / "T", seed=4, layers=2, vocab=vocab)
    paths["D"] = perturb_model(paths["S"], root / "D", 0.2)
    paths["P2"] = perturb_model(paths["P"], root / "P2", 0.2)
    paths["G2"] = perturb_model(paths["G"], root / "G2", 0.2)
    paths["Q2"] = perturb_model(paths["Q"], root / "Q2", 0.2)
    paths["G32"] = perturb_model(paths["G3"], root / "G32", 0.2)
    for name in ("S", "D", "G", "G2", "G3", "G32", "Q", "Q2", "P", "P2", "T"):
        tok.save_pretrained(str(paths[name]))
    paths["lora"] = make_random_adapter(paths["S"], root / "lora", r=4)
    paths["lora_G"] = make_random_adapter(paths["G"], root / "lora_G", r=4)
    paths["lora_Q"] = make_random_adapter(paths["Q"], root / "lora_Q", r=4)
    paths["lora_G3"] = make_random_adapter(paths["G3"], root / "lora_G3", r=4)
    paths["lora_P"] = make_random_adapter(paths["P"], root / "lora_P", r=4)
    paths["lora_T"] = make_random_adapter(paths["T"], root / "lora_T", r=4)
    paths["text"] = write_lines(root / "calib.txt", CorpusGenerator(5).sentences(24))
    return paths


def _port(cal, tmp_path, source="S", target="D", adapter="lora", **options):
    """A calibrated port; the solver itself unless a test asks for the no-harm rule or the mapped mode."""
    out = tmp_path / f"out-{source}-{target}-{len(list(tmp_path.glob('out-*')))}"
    options.setdefault("calibration", str(cal["text"]))
    options.setdefault("no_harm", False)
    options.setdefault("calib_mode", "shared")
    result = transfer(cal[adapter], cal[source], cal[target], out, method="calibrated", progress=False, **options)
    return result, out


def test_same_base_returns_the_source_adapter(cal, tmp_path) -> None:
    result, out = _port(cal, tmp_path, target="S")
    source, ported = dense_updates(cal["lora"]), dense_updates(out)
    assert set(source) == set(ported) and len(source) == 21
    for name in source:  # float32 activations: equal up to rounding
        torch.testing.assert_close(ported[name], source[name], rtol=1e-3, atol=1e-4 * float(source[name].abs().max()))
    for record in result.report.records:
        assert record.fit_after is not None and record.fit_after < 1e-6
        assert record.rank is not None and record.rank <= 4
    assert result.report.calibration["tokens"] > 100


@pytest.mark.parametrize(("base", "adapter"), [("P", "lora_P"), ("T", "lora_T")])
def test_fused_and_conv1d_modules_on_the_same_base_return_the_source(cal, tmp_path, base, adapter) -> None:
    """Phi-3's fused qkv_proj / gate_up_proj and GPT-2's transposed Conv1D weights."""
    _, out = _port(cal, tmp_path, source=base, target=base, adapter=adapter)
    source, ported = dense_updates(cal[adapter]), dense_updates(out)
    assert set(source) == set(ported)
    for name in source:
        torch.testing.assert_close(ported[name], source[name], rtol=1e-3, atol=1e-4 * float(source[name].abs().max()))


def test_phi3_derivative_port_loads_in_peft(cal, tmp_path) -> None:
    result, out = _port(cal, tmp_path, source="P", target="P2", adapter="lora_P")
    assert all(r.fit_after <= r.fit_copy + 1e-9 for r in result.report.records)
    assert peft_load_and_forward(cal["P2"], out) > 1e-4


def test_infinite_ridge_returns_the_init_end_to_end(cal, tmp_path) -> None:
    _, out = _port(cal, tmp_path, ridge=float("inf"))
    source, ported = dense_updates(cal["lora"]), dense_updates(out)
    for name in source:
        torch.testing.assert_close(ported[name], source[name], rtol=1e-4, atol=1e-6)


def test_derivative_port_fits_better_than_copying_and_loads_in_peft(cal, tmp_path) -> None:
    result, out = _port(cal, tmp_path, ridge=0.1, report_path=tmp_path / "report.json")
    records = result.report.records
    assert all(r.kept_energy is not None and r.kept_energy != pytest.approx(1.0) for r in records)
    assert all(r.fit_after <= r.fit_copy + 1e-9 for r in records)  # the copy is a candidate of the ridge problem
    assert sum(r.fit_after for r in records) < 0.9 * sum(r.fit_copy for r in records)
    assert peft_load_and_forward(cal["D"], out) > 1e-4
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(cal["D"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["calibration"]["samples"] == 24 and saved["modules"][0]["fit_after"] is not None
    assert "fit after" in (tmp_path / "report.md").read_text()


def test_output_matching_on_the_same_base_returns_the_source_adapter(cal, tmp_path) -> None:
    _, out = _port(cal, tmp_path, target="S", calib_output_weight=1.0, ridge=0.1)
    source, ported = dense_updates(cal["lora"]), dense_updates(out)
    for name in source:
        torch.testing.assert_close(ported[name], source[name], rtol=1e-3, atol=1e-4 * float(source[name].abs().max()))


def test_output_matching_with_more_rank_fits_better_and_loads(cal, tmp_path) -> None:
    plain, _ = _port(cal, tmp_path, calib_output_weight=1.0, ridge=0.1)
    result, out = _port(cal, tmp_path, calib_output_weight=1.0, ridge=0.1, calib_rank=8)
    assert all(r.rank is not None and 4 < r.rank <= 8 for r in result.report.records)
    # Layer 0's q/k/v see the same inputs in both runs (nothing upstream is ported): more rank fits better.
    first = [i for i, r in enumerate(plain.report.records) if r.target_layer == 0 and r.role in STAGE0]
    assert len(first) == 3
    for i in first:
        assert result.report.records[i].fit_after < plain.report.records[i].fit_after
    assert sum(r.fit_after for r in plain.report.records) < sum(r.fit_copy for r in plain.report.records)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert peft_load_and_forward(cal["D"], out) > 1e-4


@pytest.mark.parametrize("options", [{"ridge": "auto"}, {"calib_truncation": "svd", "init": "prolora"}])
def test_variants_run_and_stay_low_rank(cal, tmp_path, options) -> None:
    result, out = _port(cal, tmp_path, subspace_rank=8, **options)
    assert all(r.rank is not None and r.rank <= 4 for r in result.report.records)
    if options.get("ridge") == "auto":
        assert all(r.ridge in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0) for r in result.report.records)
    assert peft_load_and_forward(cal["D"], out) > 1e-4


def _merged_model(base: Path, updates: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, delta in updates.items():
            model.get_submodule(name).weight += delta.float()
    return model


def _reference_moments(teacher, student, adapter, ids: list[list[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Gram and cross moments per module from full forward passes, one sample at a time (no padding)."""
    out: dict[str, list[torch.Tensor]] = {}
    grams: dict[str, torch.Tensor] = {}
    codes: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in adapter.modules.items():
        A = module.A.double()

        def t_hook(mod, args, name=name, A=A):
            codes.setdefault(name, []).append(args[0][0].double() @ A.T)

        def s_hook(mod, args, name=name):
            out.setdefault(name, []).append(args[0][0].double())

        handles.append(teacher.get_submodule(name).register_forward_pre_hook(t_hook))
        handles.append(student.get_submodule(name).register_forward_pre_hook(s_hook))
    with torch.no_grad():
        for row in ids:
            teacher(torch.tensor([row]))
            student(torch.tensor([row]))
    for h in handles:
        h.remove()
    result = {}
    for name in adapter.modules:
        X = torch.cat(out[name])  # (T, n)
        P = torch.cat(codes[name])  # (T, r)
        grams[name] = X.T @ X
        result[name] = (grams[name], P.T @ X)
    return result


@pytest.mark.parametrize(
    "pair", [("S", "D", "lora"), ("G", "G2", "lora_G"), ("Q", "Q2", "lora_Q"), ("G3", "G32", "lora_G3")]
)
def test_streamed_moments_equal_a_full_forward_pass(cal, pair) -> None:
    """Layer by layer, padded batches, early-stopped stages == whole models with the ports merged."""
    from loraport.calibrate import read_calibration_lines, shared_tokenizer, tokenize_calibration

    source, target, adapter_name = pair
    adapter = load_adapter(cal[adapter_name])
    src, tgt = Checkpoint.open(cal[source]), Checkpoint.open(cal[target])
    pairing = Pairing(adapter, src, tgt)
    report = TransferReport("calibrated", src.name, tgt.name, "lora", {})
    parts = []
    for unit in pairing.units:
        record = __import__("loraport.report", fromlist=["ModuleRecord"]).ModuleRecord(
            unit.source.module, unit.target.module, unit.role, 0, 0, unit.source.shape, unit.target.shape
        )
        report.records.append(record)
        parts.append((unit, record, unit.source_module.B, unit.source_module.A))
    settings = CalibrationOptions(str(cal["text"]), samples=10, max_tokens=12, ridge=0.3, batch_size=4)
    calibrator = Calibrator(pairing, adapter, settings, report, progress=False)
    calibrator.recorded = {}
    results = calibrator.run(parts)
    ported = {unit.target.module: unit.source_module.scale * (B.double() @ A.double()) for unit, _, B, A in results}
    teacher = _merged_model(cal[source], {n: m.delta(F64) for n, m in adapter.modules.items()})
    student = _merged_model(cal[target], ported)
    samples, name = read_calibration_lines(cal["text"])
    ids = tokenize_calibration(samples, shared_tokenizer(src, tgt), 10, 12, name)
    assert len({len(row) for row in ids}) > 1  # padding is exercised
    reference = _reference_moments(teacher, student, adapter, ids)
    assert set(calibrator.recorded) == set(reference)
    for module, (gram, cross) in reference.items():
        stats = calibrator.recorded[module]
        torch.testing.assert_close(stats.gram.double(), gram, rtol=1e-4, atol=1e-4 * float(gram.abs().max()))
        torch.testing.assert_close(stats.cross, cross, rtol=1e-4, atol=1e-4 * float(cross.abs().max()))


# -- bad input --------------------------------------------------------------------------------


def _cli(cal, tmp_path, text_path: Path, target: str = "D") -> tuple[int, str]:
    out = tmp_path / "cli-out"
    code = main(
        ["transfer", "--adapter", str(cal["lora"]), "--source-base", str(cal["S"]), "--target-base", str(cal[target]),
         "--out", str(out), "--method", "calibrated", "--calibration", str(text_path), "--quiet"]
    )  # fmt: skip
    assert not out.exists()
    return code, str(text_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no calibration text"),
        (b"\n   \n\n", "no calibration text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "binary"),
        (b"caf\xe9 au lait\n", "not UTF-8"),
        ("Жили-были дед да баба\nи была у них курочка ряба\n".encode(), "unknown to the base models' tokenizer"),
    ],
)
def test_bad_calibration_file_exits_2_and_writes_nothing(cal, tmp_path, capsys, content, message) -> None:
    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    code, name = _cli(cal, tmp_path, path)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and name in err and len(err.strip().splitlines()) == 1


def test_cli_flags_reach_the_port(cal, tmp_path, capsys) -> None:
    out = tmp_path / "cli-ok"
    code = main(
        ["transfer", "--adapter", str(cal["lora"]), "--source-base", str(cal["S"]), "--target-base", str(cal["D"]),
         "--out", str(out), "--method", "calibrated", "--calibration", str(cal["text"]), "--calib-samples", "8",
         "--calib-max-tokens", "6", "--ridge", "0.5", "--calib-output-weight", "0", "--calib-rank", "2",
         "--keep-all", "--calib-mode", "shared", "--report", str(tmp_path / "r.json"), "--quiet"]
    )  # fmt: skip
    assert code == 0 and "calibration: 8 sample(s)" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    calibrated = report["options"]["calibrated"]
    assert calibrated["ridge"] == 0.5 and calibrated["output_weight"] == 0.0 and calibrated["no_harm"] is False
    assert all(m["rank"] <= 2 and m["calib_tokens"] <= 48 for m in report["modules"])


def test_missing_calibration_and_other_tokenizer(cal, tmp_path, capsys) -> None:
    code, _ = _cli(cal, tmp_path, tmp_path / "nope.txt")
    assert code == 2 and "calibration file not found" in capsys.readouterr().err
    with pytest.raises(LoraportError, match="needs --calibration"):
        transfer(cal["lora"], cal["S"], cal["D"], method="calibrated", progress=False)
    # A target whose tokenizer has other vocabulary entries.
    other = tmp_path / "other"
    other.mkdir()
    for f in cal["D"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    vocab_file = other / "tokenizer.json"
    data = json.loads(vocab_file.read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[10], list(vocab)[11]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    vocab_file.write_text(json.dumps(data))
    cal["other"] = other
    # Shared coordinates need one tokenizer; the default mode maps across tokenizers instead.
    with pytest.raises(LoraportError, match="same tokenizer"):
        transfer(cal["lora"], cal["S"], other, method="calibrated", calibration=str(cal["text"]), calib_mode="shared",
                 progress=False)  # fmt: skip
    result = transfer(
        cal["lora"], cal["S"], other, method="calibrated", calibration=str(cal["text"]), no_harm=False, progress=False
    )
    assert any("different tokenizers" in note for note in result.report.notes)
    assert result.report.calibration["mode"] == "mapped"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft probes a deprecated transformers attribute
def test_other_hidden_size_and_depth(cal, tmp_path) -> None:
    """Llama (hidden 64, 3 layers) -> Gemma-2 (hidden 48, 2 layers): outputs paired by importance."""
    result, out = _port(cal, tmp_path, target="G", subspace_rank=8)
    records = [r for r in result.report.records if r.decision == "transferred"]
    assert len(records) == 14  # two target layers x seven projections
    assert all("paired by importance" in r.note for r in records)
    assert all("init auto" not in r.note for r in records)  # auto = prolora here: an init for every unit
    # The solve fits the adapter's contribution on the calibration text better than its start point.
    before = sum(r.fit_before for r in records) / len(records)
    after = sum(r.fit_after for r in records) / len(records)
    assert after < before
    assert peft_load_and_forward(cal["G"], out) > 0
    # An infinite ridge returns the start point (prolora's port), as for equal shapes.
    _, inf_out = _port(cal, tmp_path, target="G", subspace_rank=8, ridge=float("inf"))
    init_out = tmp_path / "prolora-G"
    transfer(cal["lora"], cal["S"], cal["G"], init_out, method="prolora", subspace_rank=8, progress=False)
    init, ported = dense_updates(init_out), dense_updates(inf_out)
    assert set(init) == set(ported) and len(init) == 14
    for name in init:
        torch.testing.assert_close(ported[name], init[name], rtol=1e-4, atol=1e-6)
