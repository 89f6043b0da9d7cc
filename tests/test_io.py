"""Readers and writers: sharded / .bin checkpoints, hub cache, adapters, architectures, inspect."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport import Checkpoint, load_adapter, save_adapter, transfer
from loraport.architectures import KNOWN, architecture_for, infer_architecture, parse_layer_map, relative_layer_map
from loraport.cli import main
from loraport.structure import inspect_adapter

from .helpers import dense_updates, peft_load_and_forward


def test_sharded_safetensors_are_read_lazily(zoo, tmp_path) -> None:
    state = load_file(str(zoo.llama / "model.safetensors"))
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(zoo.llama / "config.json", sharded / "config.json")
    weight_map = {}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(sharded / name))
        weight_map.update(dict.fromkeys(names, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = Checkpoint.open(sharded)
    assert set(ckpt.keys()) == set(keys)
    key = keys[-1]
    assert ckpt.shape(key) == tuple(state[key].shape)
    assert torch.equal(ckpt.get(key), state[key])
    assert ckpt.file_of(key).name == "model-00002-of-00002.safetensors"
    out = tmp_path / "out"
    transfer(zoo.llama_adapter, sharded, sharded, out, method="lorax", subspace_rank=8, progress=False)
    assert peft_load_and_forward(zoo.llama, out) > 0
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(Exception, match="shard file"):
        Checkpoint.open(sharded)


def test_bin_checkpoint_loads_with_weights_only(zoo, tmp_path) -> None:
    state = load_file(str(zoo.llama / "model.safetensors"))
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(zoo.llama / "config.json", binary / "config.json")
    torch.save(state, binary / "pytorch_model.bin")
    ckpt = Checkpoint.open(binary)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ckpt.get(key), state[key])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"x": Evil()}, evil / "pytorch_model.bin")
    with pytest.raises(Exception, match="weights_only=True"):
        Checkpoint.open(evil)


def test_hub_id_resolves_through_the_local_cache(zoo, tmp_path, monkeypatch) -> None:
    # Lay out a hub cache entry by hand, as huggingface_hub would: refs/main -> snapshots/<hash>.
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(zoo.llama / name, snapshot / name)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ckpt = Checkpoint.open("tiny-org/tiny-llama")
    assert ckpt.root == snapshot and ckpt.model_type == "llama"


def test_module_names_resolve_across_prefixes(zoo, tmp_path) -> None:
    state = load_file(str(zoo.gpt2 / "model.safetensors"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(zoo.gpt2 / "config.json", bare / "config.json")
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, str(bare / "model.safetensors"))
    ckpt = Checkpoint.open(bare)
    assert ckpt.resolve_module("transformer.h.0.attn.c_attn") == "h.0.attn.c_attn.weight"
    assert ckpt.resolve_module("transformer.h.0.attn.nothing") is None


def test_adapter_round_trip_keeps_everything(zoo, tmp_path) -> None:
    adapter = load_adapter(zoo.llama_adapter)
    assert len(adapter.modules) == 21
    module = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert module.rank == 8 and module.scale == pytest.approx(16 / 8)
    save_adapter(adapter, tmp_path / "copy")
    again = load_adapter(tmp_path / "copy")
    for name, m in adapter.modules.items():
        assert torch.equal(again.modules[name].A, m.A) and torch.equal(again.modules[name].B, m.B)
    assert dense_updates(tmp_path / "copy").keys() == dense_updates(zoo.llama_adapter).keys()


def test_rank_pattern_is_read_per_module(zoo) -> None:
    adapter = zoo.adapter(
        "llama-rank-pattern", zoo.llama, r=8, seed=4, rank_pattern={"model.layers.0.mlp.down_proj": 2}
    )
    loaded = load_adapter(adapter)
    assert loaded.modules["model.layers.0.mlp.down_proj"].rank == 2
    assert loaded.modules["model.layers.1.mlp.down_proj"].rank == 8


def test_architecture_tables() -> None:
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2"):
        assert model_type in KNOWN
    llama = KNOWN["llama"]
    layer, spec = llama.parse("model.layers.12.self_attn.k_proj")
    assert layer == 12 and spec.roles == ("attn.k",)
    assert llama.parse("base_model.model.model.layers.3.mlp.down_proj")[0] == 3
    assert llama.parse("model.layers.3.mlp.act_fn") is None
    assert llama.parse("lm_head") is None
    phi3 = KNOWN["phi3"]
    spec = phi3.parse("model.layers.0.self_attn.qkv_proj")[1]
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    assert phi3.part_rows(spec, config, 128, "qkv") == [slice(0, 64), slice(64, 96), slice(96, 128)]
    with pytest.raises(Exception, match="sum to 128 rows"):
        phi3.part_rows(spec, config, 100, "qkv")
    assert KNOWN["gpt2"].transposed and not llama.transposed


def test_unknown_architecture_is_inferred_with_a_note() -> None:
    shapes = {f"backbone.blocks.{i}.attn.wq.weight": (8, 8) for i in range(3)}
    shapes |= {f"backbone.blocks.{i}.ffn.fc1.weight": (16, 8) for i in range(3)}
    shapes |= {f"backbone.blocks.{i}.norm.weight": (8,) for i in range(3)}
    arch = infer_architecture(shapes)
    assert arch.inferred and "inferred" in arch.notes[0]
    assert arch.parse("backbone.blocks.2.attn.wq")[1].roles == ("attn.q",)
    assert arch.parse("backbone.blocks.1.ffn.fc1")[1].roles == ("mlp.up",)
    assert architecture_for({"model_type": "mystery"}, shapes).inferred


def test_layer_maps() -> None:
    assert relative_layer_map(4, 4) == {i: i for i in range(4)}
    assert relative_layer_map(28, 26)[25] == 27 and relative_layer_map(28, 26)[0] == 0
    assert relative_layer_map(2, 5) == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}  # round half up: 0.5 -> 1
    assert parse_layer_map("0:1, 2:3") == {0: 1, 2: 3}


def test_inspect_matches_dense_svd(zoo) -> None:
    rows = inspect_adapter(zoo.llama_adapter, base=zoo.llama, subspace_rank=16, svd="exact")
    dense = dense_updates(zoo.llama_adapter)
    row = next(r for r in rows if r.module == "model.layers.1.self_attn.o_proj")
    S = torch.linalg.svdvals(dense[row.module])
    assert row.norm == pytest.approx(float(torch.linalg.matrix_norm(dense[row.module])), rel=1e-6)
    torch.testing.assert_close(torch.tensor(row.singular_values, dtype=torch.float64), S[:8], rtol=1e-6, atol=1e-8)
    assert row.energy_top["1"] == pytest.approx(float(S[0] ** 2 / (S**2).sum()), rel=1e-6)
    assert row.energy_top["16"] == pytest.approx(1.0)
    p = S[:8] / S[:8].sum()
    assert row.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    assert row.params == 8 * (64 + 64) and row.dense_params == 64 * 64
    W = load_file(str(zoo.llama / "model.safetensors"))[row.module + ".weight"].double()
    U, _, Vh = torch.linalg.svd(W)
    U, V = U[:, :16], Vh[:16].T
    inside = torch.linalg.matrix_norm(U @ U.T @ dense[row.module] @ V @ V.T) / torch.linalg.matrix_norm(
        dense[row.module]
    )
    assert row.in_base_subspace == pytest.approx(float(inside), rel=1e-4)
    assert 0 <= row.in_base_subspace <= row.in_base_left <= 1 + 1e-9


def test_cli_transfer_prints_summary_and_progress(zoo, tmp_path, capsys) -> None:
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(
        [
            "transfer",
            "--adapter",
            str(zoo.llama_adapter),
            "--source-base",
            str(zoo.llama),
            "--target-base",
            str(zoo.llama_derivative),
            "--out",
            str(out),
            "--method",
            "procrustes",
            "--subspace-rank",
            "8",
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "procrustes: 21/21 module(s) transferred, 0 skipped" in captured.out
    assert "mean similarity" in captured.out and "mean kept energy" in captured.out
    assert "loraport procrustes" in captured.err  # the progress bar
    assert (tmp_path / "r.json").exists() and (tmp_path / "r.md").exists()


def test_cli_inspect(zoo, capsys) -> None:
    capsys.readouterr()
    assert main(["inspect", str(zoo.llama_adapter), "--base", str(zoo.llama), "--subspace-rank", "8"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in text and "mean effective rank" in text
    assert main(["inspect", str(zoo.llama_adapter), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 21 and data[0]["rank"] == 8


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_a_model_read_in_another_type_is_converted_block_by_block(zoo, name, monkeypatch) -> None:
    """float32 files loaded as bfloat16: filled a few rows at a time, the same model as ``from_pretrained``'s
    (a tied head stays tied); names the model does not have go to ``transformers``."""
    from transformers import AutoModelForCausalLM

    from loraport.checkpoints import meta

    monkeypatch.setattr(meta, "BLOCK_BYTES", 64)  # several blocks per matrix
    path = getattr(zoo, name)
    with monkeypatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", None)  # the converted path only
        model = Checkpoint.open(path).load_causal_lm(torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is embedding.weight) == (reference.get_output_embeddings().weight is
                                                  reference.get_input_embeddings().weight)  # fmt: skip
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)
