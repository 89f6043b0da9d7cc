"""GGUF LoRA adapters (llama.cpp's --lora files): round trips, the converter's layout, ports in and out, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from loraport import batch, transfer
from loraport.adapters import GGUF_LORA_NAME, LoraAdapter, load_adapter, read_gguf_lora, save_adapter, write_gguf_lora
from loraport.checkpoints import Checkpoint
from loraport.cli import main
from loraport.errors import AdapterError
from loraport.evaluate import evaluate_path
from loraport.fusion import fuse_adapters
from loraport.zoo.gguf_export import _permute, write_gguf
from loraport.zoo.tiny import make_bpe_tokenizer, make_random_adapter, make_tiny_model, perturb_model

from .helpers import dense_updates

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def main():\n    return 42\n", "Question: 2 + 2?"] * 10
# Tiny models llama.cpp runs as transformers does (Gemma: llama.cpp scales attention by 1/sqrt(head_dim)).
TINY = {
    "llama": {},
    "qwen2": {},
    "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 32},
    "qwen3": {},
    "gemma2": {"query_pre_attn_scalar": 16},
    "phi3": {},  # fused qkv_proj and gate_up_proj
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per model type: the model directory (BPE tokenizer), its F32 GGUF, a random rank-4 PEFT adapter on it."""
    root = tmp_path_factory.mktemp("gguf-lora")
    paths: dict[str, Path] = {}
    for model_type, extra in TINY.items():
        model_dir = make_tiny_model(model_type, root / model_type, vocab=320, kv_heads=2, **extra)
        make_bpe_tokenizer(model_dir, TEXTS, 320)
        paths[model_type] = model_dir
        paths[f"{model_type}-gguf"] = write_gguf(model_dir, root / f"{model_type}.gguf", "F32")
        paths[f"{model_type}-lora"] = make_random_adapter(model_dir, root / f"{model_type}-lora", r=4)
    return paths


def assert_same_modules(a: LoraAdapter, b: LoraAdapter) -> None:
    assert list(a.modules) == list(b.modules)
    for name, module in a.modules.items():
        other = b.modules[name]
        assert torch.equal(module.A, other.A) and torch.equal(module.B, other.B), name
        assert module.scale == other.scale, name


def assert_same_updates(a: LoraAdapter, b: LoraAdapter, atol: float = 1e-5) -> None:
    assert set(a.modules) == set(b.modules)
    for name, module in a.modules.items():
        torch.testing.assert_close(module.delta(torch.float64), b.modules[name].delta(torch.float64), atol=atol, rtol=0)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", list(TINY))
def test_peft_gguf_peft_round_trip_is_exact(tiny, tmp_path, model_type: str) -> None:
    peft = load_adapter(tiny[f"{model_type}-lora"])
    base = Checkpoint.open(tiny[f"{model_type}-gguf"])
    written = write_gguf_lora(peft, tmp_path / "lora.gguf", base)
    assert_same_modules(peft, load_adapter(written))  # the file names its own layer and head counts
    assert_same_modules(peft, load_adapter(written, base=base))
    assert_same_modules(peft, load_adapter(written, base=Checkpoint.open(tiny[model_type])))  # a safetensors base
    save_adapter(load_adapter(written), tmp_path / "peft")
    assert_same_modules(peft, load_adapter(tmp_path / "peft"))


@pytest.mark.parametrize("model_type", list(TINY))
def test_identity_converts_both_ways_on_the_command_line(tiny, tmp_path, model_type: str) -> None:
    gguf_base = str(tiny[f"{model_type}-gguf"])
    common = ["--source-base", gguf_base, "--target-base", gguf_base, "--method", "identity", "--quiet"]
    out_gguf, out_peft = tmp_path / "lora.gguf", tmp_path / "peft"
    assert main(["transfer", "--adapter", str(tiny[f"{model_type}-lora"]), *common, "--out", str(out_gguf)]) == 0
    assert out_gguf.is_file()
    assert main(["transfer", "--adapter", str(out_gguf), *common, "--out", str(out_peft), "--out-format", "peft"]) == 0
    original = dense_updates(tiny[f"{model_type}-lora"])
    back = dense_updates(out_peft)
    assert set(original) == set(back)
    for name, update in original.items():
        torch.testing.assert_close(back[name], update, atol=1e-5, rtol=0)


def test_scales_that_one_alpha_cannot_hold_are_folded_into_the_factors(tiny, tmp_path) -> None:
    peft = load_adapter(tiny["llama-lora"])
    names = list(peft.modules)
    for i, name in enumerate(names):
        module = peft.modules[name]
        module.alpha = 16.0 if i % 3 else 5.0
        module.use_rslora = i % 2 == 0
    written = write_gguf_lora(peft, tmp_path / "lora.gguf", Checkpoint.open(tiny["llama-gguf"]))
    back = load_adapter(written)
    assert {m.alpha for m in back.modules.values()} == {back.modules[names[0]].alpha}  # one alpha in the file
    assert_same_updates(peft, back)


# -- llama.cpp's layout -------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", list(TINY))
def test_names_shapes_and_metadata_are_llama_cpp_s(tiny, tmp_path, model_type: str) -> None:
    import gguf

    base_file = tiny[f"{model_type}-gguf"]
    peft = load_adapter(tiny[f"{model_type}-lora"])
    written = write_gguf_lora(peft, tmp_path / "lora.gguf", Checkpoint.open(base_file))
    reader, base_reader = gguf.GGUFReader(str(written)), gguf.GGUFReader(str(base_file))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    architecture = base_reader.fields["general.architecture"].contents()
    assert fields["general.architecture"] == architecture
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert fields["adapter.lora.alpha"] == 16.0  # make_random_adapter: alpha 16 everywhere
    assert fields[f"{architecture}.block_count"] == 2

    base_tensors = {t.name: t for t in base_reader.tensors}
    lora_tensors = {t.name: t for t in reader.tensors}
    assert len(lora_tensors) == 2 * len(peft.modules)
    stems = {name.rsplit(".", 1)[0] for name in lora_tensors}
    assert stems <= set(base_tensors) and all(stem.startswith("blk.") for stem in stems)
    for stem in stems:
        a, b, w = lora_tensors[f"{stem}.lora_a"], lora_tensors[f"{stem}.lora_b"], base_tensors[stem]
        # llama-adapter.cpp: base ne[0] == a ne[0], base ne[1] == b ne[1], a ne[1] == b ne[0] (ne: GGUF order).
        assert a.shape[0] == w.shape[0] and b.shape[1] == w.shape[1] and a.shape[1] == b.shape[0] == 4
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("model_type", list(TINY))
def test_the_update_is_in_the_base_s_stored_row_order(tiny, tmp_path, model_type: str) -> None:
    """``W_stored + alpha / r * lora_b @ lora_a`` is the stored form of ``W + dW``: llama.cpp's q/k permutation (the
    converter's, as the test GGUF writer applies it) for llama, none for qwen2 / gemma3."""
    import gguf

    base_file = tiny[f"{model_type}-gguf"]
    base = Checkpoint.open(base_file)
    peft = load_adapter(tiny[f"{model_type}-lora"])
    reader = gguf.GGUFReader(str(write_gguf_lora(peft, tmp_path / "lora.gguf", base)))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    stored = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    heads, kv_heads = 4, 2  # make_tiny_model's defaults, kv_heads as built above
    permuted = 0
    for name, module in peft.modules.items():
        stem = base.gguf_names[f"{name}.weight"]
        a, b = stored[f"{stem}.lora_a"], stored[f"{stem}.lora_b"]
        expected = module.delta(torch.float64).numpy()
        if model_type == "llama" and stem.endswith(("attn_q.weight", "attn_k.weight")):
            expected = _permute(expected, heads if "attn_q" in stem else kv_heads)
            permuted += 1
        np.testing.assert_allclose(alpha / a.shape[0] * b @ a, expected, atol=1e-5, rtol=0)
    assert permuted == (4 if model_type == "llama" else 0)


def test_a_converter_file_without_head_counts_needs_its_base(tiny, tmp_path) -> None:
    """llama.cpp's converter writes no hyper-parameters: llama's permuted rows then need the base's head counts."""
    import gguf

    written = write_gguf_lora(
        load_adapter(tiny["llama-lora"]), tmp_path / "ours.gguf", Checkpoint.open(tiny["llama-gguf"])
    )
    reader = gguf.GGUFReader(str(written))
    bare = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    bare.add_type(gguf.GGUFType.ADAPTER)
    bare.add_string(gguf.Keys.Adapter.TYPE, "lora")
    bare.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    for tensor in reader.tensors:
        bare.add_tensor(tensor.name, np.asarray(tensor.data).reshape(tuple(reversed(tensor.shape.tolist()))))
    bare.write_header_to_file()
    bare.write_kv_data_to_file()
    bare.write_tensors_to_file()
    bare.close()
    with pytest.raises(AdapterError, match=r"bare\.gguf: the rows of blk\.0\.attn_[qk]\.weight\.lora_b .* head counts"):
        load_adapter(tmp_path / "bare.gguf")
    assert_same_modules(
        load_adapter(tiny["llama-lora"]), load_adapter(tmp_path / "bare.gguf", base=Checkpoint.open(tiny["llama"]))
    )


# -- ports in and out -------------------------------------------------------------------------


def test_ports_write_one_file_or_a_directory_and_equal_the_peft_port(tiny, tmp_path) -> None:
    source, source_gguf = tiny["llama"], tiny["llama-gguf"]
    target = perturb_model(source, tmp_path / "target", 0.2)
    target_gguf = write_gguf(target, tmp_path / "target.gguf", "Q8_0")
    adapter = tiny["llama-lora"]
    options = dict(method="prolora", progress=False, svd="exact", use_cache=False)
    peft = transfer(adapter, source_gguf, target_gguf, tmp_path / "peft", **options)
    single = transfer(adapter, source_gguf, target_gguf, tmp_path / "ported.gguf", **options)
    folder = transfer(adapter, source_gguf, target_gguf, tmp_path / "ported", out_format="gguf", **options)
    assert single.output == tmp_path / "ported.gguf" and single.output.is_file()
    assert sorted(p.name for p in folder.output.iterdir()) == [
        GGUF_LORA_NAME,
        "loraport_report.json",
        "loraport_report.md",
    ]
    assert (tmp_path / "ported.gguf").read_bytes() == (folder.output / GGUF_LORA_NAME).read_bytes()
    assert_same_updates(peft.adapter, load_adapter(tmp_path / "ported.gguf"))
    assert_same_updates(peft.adapter, load_adapter(folder.output, base=Checkpoint.open(target_gguf)))
    # A GGUF LoRA in: ported back, as the PEFT adapter is.
    back_peft = transfer(peft.output, target_gguf, source_gguf, **options)
    back_gguf = transfer(tmp_path / "ported.gguf", target_gguf, source_gguf, **options)
    assert_same_updates(back_peft.adapter, back_gguf.adapter, atol=1e-4)


def test_inspect_and_eval_read_gguf_loras(tiny, tmp_path, capsys) -> None:
    records = [
        {
            "id": f"q{i}",
            "question": f"What comes after {i}?",
            "choices": {"text": [str(i + 1), str(i + 2), "dog"], "label": ["A", "B", "C"]},
            "answerKey": "A",
        }
        for i in range(6)
    ]
    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    adapter, base = tiny["qwen2-lora"], tiny["qwen2-gguf"]
    lora = write_gguf_lora(load_adapter(adapter), tmp_path / "lora.gguf", Checkpoint.open(base))
    plain = evaluate_path(str(base), str(data), adapter=str(adapter), progress=False)
    from_gguf = evaluate_path(str(base), str(data), adapter=str(lora), progress=False)
    assert plain.to_dict()["acc"] == from_gguf.to_dict()["acc"] and plain.acc_norm == from_gguf.acc_norm
    assert main(["inspect", str(adapter), "--json"]) == 0
    peft_rows = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(lora), "--base", str(base), "--json"]) == 0
    gguf_rows = json.loads(capsys.readouterr().out)
    assert [r["module"] for r in gguf_rows] == [r["module"] for r in peft_rows]
    for ours, theirs in zip(gguf_rows, peft_rows, strict=True):
        assert ours["norm"] == pytest.approx(theirs["norm"], rel=1e-6)


def test_fuse_writes_a_gguf_lora(tiny, tmp_path, capsys) -> None:
    base = tiny["llama-gguf"]
    first, second = tiny["llama-lora"], make_random_adapter(tiny["llama"], tmp_path / "second", r=4, seed=5)
    second_gguf = write_gguf_lora(load_adapter(second), tmp_path / "second.gguf", Checkpoint.open(base))
    peft = fuse_adapters(first, second, tmp_path / "fused-peft", method="average", progress=False)
    out = tmp_path / "fused.gguf"
    argv = ["fuse", "--models", str(first), str(second_gguf), "--out", str(out), "--base", str(base), "--quiet"]
    assert main([*argv, "--method", "average"]) == 0
    assert_same_updates(peft.adapter, load_adapter(out))
    assert main(["fuse", "--models", str(first), str(second), "--out", str(tmp_path / "x.gguf"), "--quiet"]) == 2
    assert "needs the .gguf base" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


def test_batch_jobs_write_gguf_loras_and_resume(tiny, tmp_path) -> None:
    base = str(tiny["llama-gguf"])
    defaults = {"source_base": base, "target_base": base, "method": "identity", "out_format": "gguf"}
    jobs = [{"adapter": str(tiny["llama-lora"]), "out": "one"}]
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(yaml.safe_dump({"defaults": defaults, "jobs": jobs}))
    options = dict(workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert batch(manifest, **options).ok
    assert (tmp_path / "one" / GGUF_LORA_NAME).is_file()
    assert_same_updates(load_adapter(tiny["llama-lora"]), load_adapter(tmp_path / "one"))
    assert [job.status for job in batch(manifest, **options).jobs] == ["up to date"]


# -- bad input ----------------------------------------------------------------------------------


def _bad_files(tiny, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    import gguf

    good = write_gguf_lora(
        load_adapter(tiny["llama-lora"]), tmp_path / "good.gguf", Checkpoint.open(tiny["llama-gguf"])
    )
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-1000])
    no_alpha = tmp_path / "no-alpha.gguf"
    writer = gguf.GGUFWriter(str(no_alpha), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_tensor("blk.0.attn_v.weight.lora_a", np.zeros((4, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_v.weight.lora_b", np.zeros((32, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "model": (tiny["llama-gguf"], r"general\.type is None, expected 'adapter' \(a model file"),
        "truncated": (truncated, "corrupt or truncated GGUF"),
        "no alpha": (no_alpha, r"no adapter\.lora\.alpha"),
    }


def test_bad_gguf_loras_are_one_line_errors_and_nothing_is_written(tiny, tmp_path, capsys) -> None:
    base = str(tiny["llama-gguf"])
    for what, (path, message) in _bad_files(tiny, tmp_path).items():
        with pytest.raises(AdapterError, match=message):
            read_gguf_lora(path)
        for out in (tmp_path / "out.gguf", tmp_path / "out"):
            argv = ["transfer", "--adapter", str(path), "--source-base", base, "--target-base", base]
            assert main([*argv, "--out", str(out), "--out-format", "gguf", "--quiet"]) == 2, what
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith(f"loraport: error: {path}") and len([e for e in err if "error" in e]) == 1
            assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temporary left behind"


def _broken_files(tiny, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A GGUF LoRA cut to half its size, one with all but its first bytes zeroed (an interrupted download into a
    preallocated file), one whose header reads as an empty GGUF, and two cut inside the magic bytes; with the
    message each must give."""
    good = write_gguf_lora(
        load_adapter(tiny["llama-lora"]), tmp_path / "good.gguf", Checkpoint.open(tiny["llama-gguf"])
    ).read_bytes()
    truncated = "corrupt or truncated GGUF file"
    cuts = {
        "half": (good[: len(good) // 2], truncated),
        "zeroed": (good[:9] + bytes(len(good) - 9), truncated),  # counts partly zero: empty keys, nameless tensors
        "empty header": (good[:6] + bytes(len(good) - 6), "no metadata and no tensors: not a readable GGUF LoRA"),
        "two bytes": (good[:2], truncated),
        "empty": (b"", truncated),
    }
    broken = {}
    for what, (data, message) in cuts.items():
        path = tmp_path / f"{what.replace(' ', '-')}.gguf"
        path.write_bytes(data)
        broken[what] = (path, message)
    return broken


def test_a_broken_gguf_lora_is_called_broken_not_a_model(tiny, tmp_path, capsys) -> None:
    base, good = str(tiny["llama-gguf"]), str(tmp_path / "good.gguf")
    for what, (path, message) in _broken_files(tiny, tmp_path).items():
        with pytest.raises(AdapterError, match=f"^{path}: .*{message}") as error:
            load_adapter(path)
        assert "\n" not in str(error.value) and "as a base" not in str(error.value), what
        commands = [["inspect", str(path)]]
        if "truncated" in message:  # fuse sorts inputs into models and adapters: an unreadable file is neither
            out = str(tmp_path / f"fused-{path.stem}")
            commands.append(["fuse", "--models", good, str(path), "--base", base, "--out", out, "--quiet"])
        for argv in commands:
            assert main(argv) == 2, (what, argv[0])
            err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
            assert len(err) == 1 and err[0].startswith(f"loraport: error: {path}: "), (what, argv[0], err)
            assert message in err[0] and "as a base" not in err[0], (what, argv[0], err)
    with pytest.raises(AdapterError, match=r"a model file: pass it as a base, not as --adapter"):
        load_adapter(tiny["llama-gguf"])  # a whole GGUF model is still told apart from a broken adapter


def test_gguf_output_needs_a_gguf_target_and_is_checked_before_any_work(tiny, tmp_path, capsys) -> None:
    adapter, base = str(tiny["llama-lora"]), str(tiny["llama-gguf"])
    argv = ["transfer", "--adapter", adapter, "--source-base", base, "--quiet"]
    assert main([*argv, "--target-base", str(tiny["llama"]), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "needs the .gguf base" in capsys.readouterr().err
    assert main([*argv, "--target-base", base, "--out", str(tmp_path / "y.gguf"), "--out-format", "peft"]) == 2
    assert "a PEFT adapter is a directory" in capsys.readouterr().err
    (tmp_path / "z.gguf").write_text("x")
    assert main([*argv, "--target-base", base, "--out", str(tmp_path / "z.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "z.gguf").read_text() == "x"
    other = tmp_path / "qwen2.gguf"
    shutil.copy(tiny["qwen2-gguf"], other)
    written = write_gguf_lora(load_adapter(tiny["llama-lora"]), tmp_path / "llama-lora.gguf", Checkpoint.open(base))
    with pytest.raises(AdapterError, match=r"a LoRA for llama, but the base .* is qwen2"):
        load_adapter(written, base=Checkpoint.open(other))
