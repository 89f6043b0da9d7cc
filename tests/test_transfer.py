"""End to end on tiny random transformers models: pairing, methods, PEFT loading, report, cache."""

from __future__ import annotations

import json

import pytest
import torch

from loraport import TransferError, load_adapter, transfer
from loraport.architectures import relative_layer_map
from loraport.subspace import top_k_svd

from .helpers import base_weight, dense_updates, peft_load_and_forward

SUBSPACE_METHODS = ["project", "lorax", "procrustes", "prolora"]


@pytest.mark.parametrize("method", ["identity", *SUBSPACE_METHODS])
def test_llama_to_llama_derivative(zoo, tmp_path, method: str) -> None:
    out = tmp_path / "out"
    result = transfer(
        zoo.llama_adapter, zoo.llama, zoo.llama_derivative, out, method=method, subspace_rank=16, progress=False
    )
    assert result.report.totals()["transferred"] == 21
    assert peft_load_and_forward(zoo.llama_derivative, out) > 1e-4
    source, target = dense_updates(zoo.llama_adapter), dense_updates(out)
    assert set(source) == set(target)
    if method == "identity":
        for name in source:
            torch.testing.assert_close(target[name], source[name], rtol=1e-5, atol=1e-6)
    record = result.report.records[0]
    assert record.kept_energy is not None and 0 < record.kept_energy <= 1.0 + 1e-6
    if method != "identity":
        assert record.sim is not None and 0 <= record.sim <= 1


def test_project_matches_dense_reference_on_saved_files(zoo, tmp_path) -> None:
    out = tmp_path / "out"
    transfer(
        zoo.llama_adapter,
        zoo.llama,
        zoo.llama_derivative,
        out,
        method="project",
        subspace_rank=12,
        svd="exact",
        progress=False,
    )
    name = "model.layers.1.mlp.down_proj"
    W_t = base_weight(zoo.llama_derivative, f"{name}.weight")
    sub = top_k_svd(W_t, 12, "exact")
    U, V = sub.U, sub.V
    expected = U @ U.T @ dense_updates(zoo.llama_adapter)[name] @ V @ V.T
    torch.testing.assert_close(dense_updates(out)[name], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", SUBSPACE_METHODS)
def test_qwen2_to_gemma2_other_width_depth_and_gqa(zoo, tmp_path, method: str) -> None:
    out = tmp_path / "out"
    result = transfer(zoo.qwen2_adapter, zoo.qwen2, zoo.gemma2, out, method=method, subspace_rank=16, progress=False)
    report = result.report
    assert report.layer_map == relative_layer_map(4, 3) == {0: 0, 1: 2, 2: 3}
    assert report.totals()["transferred"] == 21  # 3 target layers x 7 roles
    assert sum(1 for r in report.records if r.reason == "source layer has no target layer in the layer map") == 7
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(zoo.gemma2)
    assert config["r"] == 16
    assert peft_load_and_forward(zoo.gemma2, out) > 1e-4
    for record in report.transferred:
        assert record.note.startswith("dims adapted") or record.note.startswith("different dims")
        assert record.rank is None or record.rank <= 16


def test_identity_across_widths_skips_everything(zoo, tmp_path) -> None:
    with pytest.raises(TransferError, match="every module was skipped"):
        transfer(zoo.qwen2_adapter, zoo.qwen2, zoo.gemma2, tmp_path / "out", method="identity", progress=False)
    assert not (tmp_path / "out").exists()


def test_phi3_fused_to_phi3_is_ported_whole(zoo, tmp_path) -> None:
    out = tmp_path / "out"
    result = transfer(zoo.phi3_adapter, zoo.phi3, zoo.phi3, out, method="identity", progress=False)
    assert result.report.totals()["units"] == 12  # 3 layers x 4 modules, not split
    source, target = dense_updates(zoo.phi3_adapter), dense_updates(out)
    for name in source:
        torch.testing.assert_close(target[name], source[name], rtol=1e-5, atol=1e-6)
    assert peft_load_and_forward(zoo.phi3, out) > 1e-4


def test_phi3_fused_split_into_llama_roles(zoo, tmp_path) -> None:
    out = tmp_path / "out"
    result = transfer(zoo.phi3_adapter, zoo.phi3, zoo.llama, out, method="identity", progress=False)
    assert result.report.totals()["transferred"] == 3 * 7
    source, target = dense_updates(zoo.phi3_adapter), dense_updates(out)
    q_dim, kv_dim, inter = 64, 32, 128
    for layer in range(3):
        qkv = source[f"model.layers.{layer}.self_attn.qkv_proj"]
        gate_up = source[f"model.layers.{layer}.mlp.gate_up_proj"]
        pieces = {
            "self_attn.q_proj": qkv[:q_dim],
            "self_attn.k_proj": qkv[q_dim : q_dim + kv_dim],
            "self_attn.v_proj": qkv[q_dim + kv_dim :],
            "mlp.gate_proj": gate_up[:inter],
            "mlp.up_proj": gate_up[inter:],
        }
        for suffix, expected in pieces.items():
            torch.testing.assert_close(target[f"model.layers.{layer}.{suffix}"], expected, rtol=1e-5, atol=1e-6)
    assert peft_load_and_forward(zoo.llama, out) > 1e-4


def test_llama_roles_fused_into_phi3(zoo, tmp_path) -> None:
    out = tmp_path / "out"
    transfer(zoo.llama_adapter, zoo.llama, zoo.phi3, out, method="identity", progress=False)
    source, target = dense_updates(zoo.llama_adapter), dense_updates(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"]["model.layers.0.self_attn.qkv_proj"] == 24  # q, k, v: 3 x r
    assert config["rank_pattern"]["model.layers.0.mlp.gate_up_proj"] == 16
    for layer in range(3):
        p = f"model.layers.{layer}."
        qkv = torch.cat(
            [source[p + "self_attn.q_proj"], source[p + "self_attn.k_proj"], source[p + "self_attn.v_proj"]]
        )
        torch.testing.assert_close(target[p + "self_attn.qkv_proj"], qkv, rtol=1e-5, atol=1e-6)
        gate_up = torch.cat([source[p + "mlp.gate_proj"], source[p + "mlp.up_proj"]])
        torch.testing.assert_close(target[p + "mlp.gate_up_proj"], gate_up, rtol=1e-5, atol=1e-6)
    assert peft_load_and_forward(zoo.phi3, out) > 1e-4


def test_gpt2_conv1d_project_uses_the_transposed_base(zoo, tmp_path) -> None:
    out = tmp_path / "out"
    transfer(zoo.gpt2_adapter, zoo.gpt2, zoo.gpt2, out, method="project", subspace_rank=8, svd="exact", progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    name = "transformer.h.0.attn.c_proj"
    W = base_weight(zoo.gpt2, f"{name}.weight", transposed=True)  # Conv1D stores (in, out)
    sub = top_k_svd(W, 8, "exact")
    expected = sub.U @ sub.U.T @ dense_updates(zoo.gpt2_adapter)[name] @ sub.V @ sub.V.T
    torch.testing.assert_close(dense_updates(out)[name], expected, rtol=1e-4, atol=1e-5)
    assert peft_load_and_forward(zoo.gpt2, out) > 1e-4


def test_gpt2_to_llama_splits_c_attn_and_reports_missing_roles(zoo, tmp_path) -> None:
    out = tmp_path / "out"
    result = transfer(zoo.gpt2_adapter, zoo.gpt2, zoo.llama, out, method="prolora", subspace_rank=8, progress=False)
    roles = {r.role for r in result.report.transferred}
    assert {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"} <= roles
    assert peft_load_and_forward(zoo.llama, out) > 1e-4


def test_second_port_to_same_target_hits_the_cache(zoo, tmp_path) -> None:
    first = transfer(
        zoo.llama_adapter,
        zoo.llama,
        zoo.llama_derivative,
        tmp_path / "a",
        method="lorax",
        subspace_rank=8,
        progress=False,
    )
    second = transfer(
        zoo.llama_adapter,
        zoo.llama,
        zoo.llama_derivative,
        tmp_path / "b",
        method="lorax",
        subspace_rank=8,
        progress=False,
    )
    assert first.report.cache_misses == 42 and first.report.cache_hits == 0
    assert second.report.cache_hits == 42 and second.report.cache_misses == 0
    a, b = dense_updates(tmp_path / "a"), dense_updates(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name])


def test_threshold_skips_and_fallback_replaces(zoo, tmp_path) -> None:
    # An unrelated base (other seed): similarities near chance, so a threshold of 0.5 skips all.
    other = zoo.model("llama-other", "llama", seed=7, layers=3)
    with pytest.raises(TransferError, match="every module was skipped"):
        transfer(
            zoo.llama_adapter,
            zoo.llama,
            other,
            tmp_path / "x",
            method="project",
            threshold=0.5,
            subspace_rank=8,
            progress=False,
        )
    result = transfer(
        zoo.llama_adapter,
        zoo.llama,
        other,
        tmp_path / "y",
        method="project",
        threshold=0.5,
        fallback="identity",
        subspace_rank=8,
        progress=False,
    )
    assert all(r.decision == "fallback:identity" for r in result.report.records)
    by_type = transfer(
        zoo.llama_adapter,
        zoo.llama,
        zoo.llama_derivative,
        tmp_path / "z",
        method="project",
        threshold_by_type={"q_proj": 1.01},
        subspace_rank=8,
        progress=False,
    )
    skipped = {r.role for r in by_type.report.skipped}
    assert skipped == {"attn.q"}


def test_explicit_layer_map_and_report_files(zoo, tmp_path) -> None:
    out, report = tmp_path / "out", tmp_path / "rep" / "report.json"
    result = transfer(
        zoo.llama_adapter,
        zoo.llama,
        zoo.llama_derivative,
        out,
        method="prolora",
        layer_map={0: 2, 1: 1, 2: 0},
        subspace_rank=8,
        report_path=report,
        progress=False,
    )
    assert result.report.layer_map == {0: 2, 1: 1, 2: 0}
    data = json.loads(report.read_text())
    assert data["totals"]["transferred"] == 21 and data["layer_map"] == {"0": 2, "1": 1, "2": 0}
    first = data["modules"][0]
    assert {"sim_U", "sim_V", "sim_above_chance", "kept_energy", "decision", "k"} <= set(first)
    assert report.with_suffix(".md").read_text().startswith("# loraport transfer report")
    assert (out / "loraport_report.json").exists()
    pairs = {(r["source_layer"], r["target_layer"]) for r in data["modules"]}
    assert pairs == {(2, 0), (1, 1), (0, 2)}


def test_rslora_and_alpha_pattern_scales_are_preserved(zoo, tmp_path) -> None:
    adapter = zoo.adapter(
        "llama-rslora", zoo.llama, r=8, seed=3, use_rslora=True, alpha_pattern={"model.layers.1.self_attn.v_proj": 5}
    )
    out = tmp_path / "out"
    transfer(adapter, zoo.llama, zoo.llama_derivative, out, method="identity", progress=False)
    source, target = dense_updates(adapter), dense_updates(out)
    loaded = load_adapter(adapter)
    assert loaded.modules["model.layers.1.self_attn.v_proj"].alpha == 5
    for name in source:
        torch.testing.assert_close(target[name], source[name], rtol=1e-5, atol=1e-6)
    assert peft_load_and_forward(zoo.llama_derivative, out) > 1e-4


def test_k_above_min_dimension_is_clamped_and_reported(zoo, tmp_path) -> None:
    result = transfer(
        zoo.llama_adapter,
        zoo.llama,
        zoo.llama_derivative,
        tmp_path / "out",
        method="lorax",
        subspace_rank=500,
        progress=False,
    )
    assert any("clamped" in note for note in result.report.notes)
    assert max(r.k for r in result.report.records) == 64  # min(m, n) of the tiny llama matrices


def test_default_method_copies_equal_shapes_and_adapts_the_rest(zoo, tmp_path) -> None:
    same = transfer(zoo.llama_adapter, zoo.llama, zoo.llama_derivative, tmp_path / "a", progress=False)
    assert same.report.method == "auto" and same.report.cache_misses == 0  # no SVD needed
    source, target = dense_updates(zoo.llama_adapter), dense_updates(tmp_path / "a")
    for name in source:
        torch.testing.assert_close(target[name], source[name], rtol=1e-5, atol=1e-6)
    cross = transfer(zoo.qwen2_adapter, zoo.qwen2, zoo.gemma2, tmp_path / "b", subspace_rank=16, progress=False)
    transfer(
        zoo.qwen2_adapter, zoo.qwen2, zoo.gemma2, tmp_path / "c", method="prolora", subspace_rank=16, progress=False
    )
    assert all(r.note.startswith("auto: prolora") for r in cross.report.transferred)
    a, b = dense_updates(tmp_path / "b"), dense_updates(tmp_path / "c")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
