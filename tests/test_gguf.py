"""GGUF bases: tiny models written with gguf's writer, read back one tensor at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraport import transfer
from loraport.checkpoints import Checkpoint, GGUFCheckpoint
from loraport.cli import main
from loraport.errors import CheckpointError
from loraport.evaluate import evaluate_path
from loraport.zoo.gguf_export import write_gguf
from loraport.zoo.tiny import make_bpe_tokenizer, make_random_adapter, make_tiny_model, perturb_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n",
    "Hello world, this is a small test of byte-level tokenizers.",
    "Question: What is the capital of France?\nAnswer: Paris",
] * 10
COSMETIC = {"dtype", "_name_or_path", "_model_name_or_path", "quantization_config", "transformers_version"}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama / qwen2 / gemma3 models (vocabulary 320, a byte-level BPE) and their GGUF files."""
    root = tmp_path_factory.mktemp("gguf")
    paths: dict[str, Path] = {}
    for model_type, extra in (("llama", {}), ("qwen2", {}), ("gemma3_text", {"head_dim": 32})):
        model_dir = make_tiny_model(model_type, root / model_type, vocab=320, kv_heads=2, **extra)
        make_bpe_tokenizer(model_dir, TEXTS, 320)
        paths[model_type] = model_dir
        for qtype in ("F32", "F16", "Q8_0"):
            gguf_dir = root / f"{model_type}-{qtype}"
            gguf_dir.mkdir()
            paths[f"{model_type}-{qtype}"] = write_gguf(model_dir, gguf_dir / "model.gguf", qtype)
    return paths


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_read_back_equals_transformers(ggufs, model_type: str, qtype: str) -> None:
    from transformers import AutoModelForCausalLM

    path = ggufs[f"{model_type}-{qtype}"]
    ckpt = Checkpoint.open(path)
    assert isinstance(ckpt, GGUFCheckpoint)
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = reference.state_dict()
    tied = {"lm_head.weight"} if reference.config.tie_word_embeddings else set()
    assert set(ckpt.keys()) == set(state) - tied
    for key in ckpt.keys():
        tensor = ckpt.get(key)
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == ckpt.shape(key)
        assert torch.equal(tensor, state[key]), key
    ours = {k: v for k, v in ckpt.config.items() if k not in COSMETIC}
    theirs = {k: v for k, v in reference.config.to_dict().items() if k not in COSMETIC}
    assert ours == theirs
    # F32 is lossless: the q/k permutation and Gemma's 1 + w norms are undone exactly.
    original = load_file(str(ggufs[model_type] / "model.safetensors"))
    for key in ckpt.keys():
        error = (ckpt.get(key) - original[key].float()).abs().max().item()
        assert error <= {"F32": 0.0, "F16": 1e-3, "Q8_0": 2e-2}[qtype] * max(1.0, original[key].abs().max().item())


def test_rows_and_directory_and_tokenizer(ggufs, tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("LORAPORT_CACHE", str(tmp_path / "cache" / "subspaces"))
    path = ggufs["llama-Q8_0"]
    by_dir = Checkpoint.open(path.parent)  # a directory whose only weights are one .gguf
    assert isinstance(by_dir, GGUFCheckpoint)
    key = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(by_dir.get(key, rows=(3, 9)), by_dir.get(key)[3:9])
    tokenizer = by_dir.load_tokenizer()
    original = AutoTokenizer.from_pretrained(str(ggufs["llama"]))
    for text in ("Hello world, def main(): return 42", "The lazy dog? Paris!"):
        assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert list((tmp_path / "cache" / "gguf").iterdir()), "the converted tokenizer is cached"
    files = by_dir.side_files()
    assert "config.json" in files and "tokenizer.json" in files


def test_port_with_gguf_bases_equals_safetensors_port(ggufs, tmp_path) -> None:
    source = ggufs["llama"]
    target = perturb_model(source, tmp_path / "target", 0.2)
    shutil.copy(source / "tokenizer.json", target / "tokenizer.json")
    adapter = make_random_adapter(source, tmp_path / "lora", r=4)
    gguf_source = ggufs["llama-F32"]
    gguf_target = write_gguf(target, tmp_path / "target.gguf", "F32")
    for method in ("identity", "prolora", "lorax"):
        plain = transfer(adapter, source, target, method=method, progress=False, svd="exact", use_cache=False)
        gguf = transfer(adapter, gguf_source, gguf_target, method=method, progress=False, svd="exact", use_cache=False)
        assert set(plain.adapter.modules) == set(gguf.adapter.modules)
        for name, module in plain.adapter.modules.items():
            other = gguf.adapter.modules[name]
            dense = module.scale * module.B.double() @ module.A.double()
            assert torch.allclose(dense, other.scale * other.B.double() @ other.A.double(), atol=1e-6), (method, name)


def test_eval_and_inspect_accept_gguf(ggufs, tmp_path, capsys) -> None:
    data = tmp_path / "arc.jsonl"
    records = [
        {
            "id": f"q{i}",
            "question": f"What comes after {i}?",
            "choices": {"text": [str(i + 1), str(i + 2), "dog"], "label": ["A", "B", "C"]},
            "answerKey": "A",
        }
        for i in range(6)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    adapter = make_random_adapter(ggufs["qwen2"], tmp_path / "lora", r=4)
    gguf_dir = ggufs["qwen2-F32"].parent  # no tokenizer files: the GGUF carries its own
    plain = evaluate_path(str(ggufs["qwen2"]), str(data), adapter=str(adapter), progress=False)
    from_gguf = evaluate_path(str(ggufs["qwen2-F32"]), str(data), adapter=str(adapter), progress=False)
    assert (plain.acc, plain.acc_norm) == (from_gguf.acc, from_gguf.acc_norm)
    assert main(["inspect", str(adapter), "--base", str(gguf_dir), "--subspace-rank", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(row["in_base_subspace"] is not None for row in rows)


def test_bad_gguf_files_are_clear_errors(ggufs, tmp_path, capsys) -> None:
    good = ggufs["llama-Q8_0"].read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) - 1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF"):
        Checkpoint.open(truncated)
    header_cut = tmp_path / "cut.gguf"
    header_cut.write_bytes(good[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF"):
        Checkpoint.open(header_cut)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        Checkpoint.open(not_gguf)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(ggufs["llama-F32"], two / name)
    with pytest.raises(CheckpointError, match="several GGUF files"):
        Checkpoint.open(two)
    adapter = make_random_adapter(ggufs["llama"], tmp_path / "lora", r=4)
    out = tmp_path / "out"
    args = ["--adapter", str(adapter), "--source-base", str(truncated), "--target-base", str(ggufs["llama"])]
    code = main(["transfer", *args, "--out", str(out), "--quiet"])
    assert code == 2 and not out.exists()
    assert "truncated" in capsys.readouterr().err


def test_unknown_quantization_type_names_tensor_and_type(ggufs, tmp_path) -> None:
    ckpt = Checkpoint.open(ggufs["llama-F32"])
    key = "model.layers.0.mlp.up_proj.weight"
    info = ckpt._info(key)
    object.__setattr__(info, "ggml_type", 4)  # ggml type 4 (Q4_2) was removed from ggml
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight.*ggml type 4"):
        ckpt.get(key)


def test_fuse_accepts_gguf_models_and_writes_a_loadable_model(ggufs, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraport.fusion import fuse

    source = ggufs["llama"]
    other = perturb_model(source, tmp_path / "other", 0.1)
    other_gguf = write_gguf(other, tmp_path / "other.gguf", "F32")
    out = tmp_path / "fused"
    fuse(ggufs["llama-F32"], other_gguf, out, method="average", progress=False)
    fused = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    first, second = load_file(str(source / "model.safetensors")), load_file(str(other / "model.safetensors"))
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(fused[key], (first[key] + second[key]) / 2, rtol=1e-5, atol=1e-6)
    # The config and tokenizer come from the GGUF metadata.
    text = "Hello world, def main(): return 42"
    assert (
        AutoTokenizer.from_pretrained(str(out))(text)["input_ids"]
        == AutoTokenizer.from_pretrained(str(source))(text)["input_ids"]
    )
