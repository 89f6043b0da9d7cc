"""RegMean end to end: streamed Gram matrices against a plain forward pass, fused models and adapters.

Tiny models with a word-level tokenizer over their vocabulary (the numbers 0-59): a llama base C,
two derivatives A and B, two LoRAs X and Y on C, and a GPT-2 pair (``Conv1D`` weights are
stored transposed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loraport.checkpoints import Checkpoint
from loraport.cli import main
from loraport.fusion import FusionError, RegMeanOptions, fuse, fuse_adapters
from loraport.fusion.grams import LayerGrams
from loraport.fusion.regmean import regmean
from loraport.zoo.corpus import SPECIAL_TOKENS, build_tokenizer
from loraport.zoo.tiny import make_random_adapter, make_tiny_model, perturb_model

VOCAB = 64
SIZE = dict(hidden=32, intermediate=64, vocab=VOCAB, layers=2)
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("regmean")
    tokenizer = build_tokenizer(SPECIAL_TOKENS + [str(i) for i in range(VOCAB - len(SPECIAL_TOKENS))])
    paths = {"root": root, "C": make_tiny_model("llama", root / "C", seed=0, **SIZE)}
    paths["A"] = perturb_model(paths["C"], root / "A", drift=0.2, seed=1)
    paths["B"] = perturb_model(paths["C"], root / "B", drift=0.2, seed=2)
    paths["G"] = make_tiny_model("gpt2", root / "G", seed=3, hidden=32, vocab=VOCAB, layers=1)
    paths["G2"] = perturb_model(paths["G"], root / "G2", drift=0.2, seed=4)
    paths["G3"] = perturb_model(paths["G"], root / "G3", drift=0.2, seed=5)
    for name in ("C", "A", "B", "G", "G2", "G3"):
        tokenizer.save_pretrained(str(paths[name]))
    paths["X"] = make_random_adapter(paths["C"], root / "X", r=4, alpha=8, seed=0)
    paths["Y"] = make_random_adapter(paths["C"], root / "Y", r=2, alpha=4, seed=1)
    text = root / "calibration.txt"
    lines = [" ".join(str((5 * i + 3 * j * j) % 60) for j in range(4 + i % 9)) for i in range(20)]
    text.write_text("\n".join(lines) + "\n")
    paths["text"] = text
    return paths


def _state(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(path) as ckpt:
        return {k: ckpt.get(k).clone() for k in ckpt.keys()}


def reference_grams(model: torch.nn.Module, tokenizer, lines: list[str], names: list[str]) -> dict[str, torch.Tensor]:
    """``X^T X`` of each named module's input, one sample at a time (no padding), float64."""
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for line in lines:
            ids = tokenizer(line, truncation=True, max_length=128)["input_ids"]
            model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return grams


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Frobenius-relative error below ``tol`` (activations run in float32, the references in float64)."""
    error = float(torch.linalg.norm(got.double() - expected.double()) / torch.linalg.norm(expected.double()))
    assert error < tol, error


def _lines(models) -> list[str]:
    return [line for line in models["text"].read_text().splitlines() if line.strip()]


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_streamed_grams_match_a_plain_forward_pass(models):
    settings = RegMeanOptions(calibration=models["text"], batch_size=6)
    with Checkpoint.open(models["A"]) as a, Checkpoint.open(models["B"]) as b:
        from loraport.architectures import architecture_for

        grams = LayerGrams([a, b], architecture_for(a.config), settings)
        streamed = {(layer, s): grams.get(layer, s) for layer in range(2) for s in LINEAR}
    assert grams.samples == 40 and grams.tokens == 2 * sum(len(line.split()) for line in _lines(models))
    for index, name in enumerate(("A", "B")):
        names = [f"model.layers.{layer}.{s}" for layer in range(2) for s in LINEAR]
        expected = reference_grams(_model(models[name]), _tokenizer(models[name]), _lines(models), names)
        for layer in range(2):
            for suffix in LINEAR:
                got = streamed[(layer, suffix)][index]
                assert_rel_close(got, expected[f"model.layers.{layer}.{suffix}"], 1e-6)
    assert streamed[(0, "self_attn.q_proj")][0] is streamed[(0, "self_attn.k_proj")][0]  # one input, one Gram


def test_fused_model_is_regmean_of_its_linear_layers(models, tmp_path):
    result = fuse(
        models["A"], models["B"], tmp_path / "out", method="regmean", calibration=models["text"], progress=False
    )
    a, b, out = _state(models["A"]), _state(models["B"]), _state(tmp_path / "out")
    names = [f"model.layers.{layer}.{s}" for layer in range(2) for s in LINEAR]
    grams = [reference_grams(_model(models[n]), _tokenizer(models[n]), _lines(models), names) for n in ("A", "B")]
    for name in names:
        key = f"{name}.weight"
        assert_rel_close(out[key], regmean([a[key], b[key]], [g[name] for g in grams]), 1e-5)
    emb = "model.embed_tokens.weight"
    assert torch.equal(out[emb], (a[emb] + b[emb]) / 2)
    actions = result.report.counts()
    assert actions["regmean"] == 14 and actions["average"] == 2  # 7 linear x 2 layers; embed, lm_head
    records = {r.name: r for r in result.report.records}
    assert "regmean fallback" in records[emb].note
    assert result.report.calibration["samples"] == 40
    assert any(n.startswith("regmean: input Grams of 2 models from 40 sample(s)") for n in result.report.notes)


def test_regmean_task_arithmetic_fallback_and_three_models(models, tmp_path):
    result = fuse(
        models["A"],
        models["B"],
        tmp_path / "out",
        more=[models["C"]],
        base=models["C"],
        method="regmean",
        calibration=models["text"],
        fallback="task_arithmetic",
        scaling=0.5,
        progress=False,
    )
    a, b, c, out = _state(models["A"]), _state(models["B"]), _state(models["C"]), _state(tmp_path / "out")
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(out[emb], c[emb] + 0.5 * ((a[emb] - c[emb]) + (b[emb] - c[emb])))
    assert result.report.inputs[2] == str(models["C"]) and result.report.base == str(models["C"])
    assert {r.action for r in result.report.records} >= {"regmean", "task_arithmetic"}


def test_gpt2_conv1d_weights_are_merged_in_linear_layout(models, tmp_path):
    fuse(models["G2"], models["G3"], tmp_path / "out", method="regmean", calibration=models["text"], progress=False)
    g2, g3, out = _state(models["G2"]), _state(models["G3"]), _state(tmp_path / "out")
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]
    grams = [reference_grams(_model(models[n]), _tokenizer(models[n]), _lines(models), names) for n in ("G2", "G3")]
    for name in names:
        key = f"{name}.weight"  # stored (in, out)
        assert_rel_close(out[key], regmean([g2[key].T, g3[key].T], [g[name] for g in grams]).T, 1e-5)


def test_adapters_regmean_equals_dense_regmean_of_the_merged_models(models):
    from peft import PeftModel

    result = fuse_adapters(
        models["X"], models["Y"], method="regmean", base=models["C"], calibration=models["text"], progress=False
    )
    c = _state(models["C"])
    names = [f"base_model.model.model.layers.{layer}.{s}.base_layer" for layer in range(2) for s in LINEAR]
    grams = []
    for adapter in ("X", "Y"):
        peft_model = PeftModel.from_pretrained(_model(models["C"]), str(models[adapter])).eval()
        merged = peft_model.merge_and_unload()
        plain = [n.removeprefix("base_model.model.").removesuffix(".base_layer") for n in names]
        grams.append(reference_grams(merged, _tokenizer(models["C"]), _lines(models), plain))
    from loraport.adapters import load_adapter

    deltas = [{n: m.delta(torch.float64) for n, m in load_adapter(models[x]).modules.items()} for x in ("X", "Y")]
    fused = {n: m.delta(torch.float64) for n, m in result.adapter.modules.items()}
    for layer in range(2):
        for suffix in LINEAR:
            name = f"model.layers.{layer}.{suffix}"
            W0 = c[f"{name}.weight"].double()
            expected = regmean([W0 + deltas[0][name], W0 + deltas[1][name]], [g[name] for g in grams]) - W0
            assert_rel_close(fused[name], expected, 1e-5)
    assert result.report.base == str(models["C"])
    assert all(r.out_rank <= 6 for r in result.report.records if r.action == "regmean")


def test_regmean_bad_inputs(models, tmp_path, capsys):
    with pytest.raises(FusionError, match="regmean needs calibration text"):
        fuse(models["A"], models["B"], tmp_path / "no", method="regmean", progress=False)
    orphan = tmp_path / "orphan"  # an adapter whose base_model_name_or_path does not exist here
    shutil.copytree(models["X"], orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "nowhere" / Path(config["base_model_name_or_path"]).name)
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    rc = main(["fuse", "--models", str(orphan), str(models["Y"]), "--out", str(tmp_path / "o"), "--quiet",
               "--method", "regmean", "--calibration", str(models["text"])])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "needs the base model they were trained on (--base)" in err and len(err.splitlines()) == 1
    missing = tmp_path / "missing.txt"
    rc = main(["fuse", "--models", str(models["A"]), str(models["B"]), "--out", str(tmp_path / "o2"), "--quiet",
               "--method", "regmean", "--calibration", str(missing)])  # fmt: skip
    assert rc == 2 and "calibration file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_each_model_can_bring_its_own_calibration_text(models, tmp_path, capsys):
    """RegMean's own setting: model i's Gram from unlabeled inputs of its own task (one file per model)."""
    other = tmp_path / "other.txt"
    other.write_text("\n".join(" ".join(str((11 * i + j) % 60) for j in range(6)) for i in range(12)) + "\n")
    out = tmp_path / "out"
    argv = ["fuse", "--models", str(models["A"]), str(models["B"]), "--out", str(out), "--method", "regmean"]
    assert main([*argv, "--calibration", str(models["text"]), str(other), "--quiet"]) == 0
    capsys.readouterr()
    name = "model.layers.1.self_attn.v_proj"
    texts = {"A": _lines(models), "B": other.read_text().splitlines()}
    grams = {n: reference_grams(_model(models[n]), _tokenizer(models[n]), texts[n], [name])[name] for n in "AB"}
    a, b, fused = _state(models["A"]), _state(models["B"]), _state(out)
    key = f"{name}.weight"
    assert_rel_close(fused[key], regmean([a[key], b[key]], [grams["A"], grams["B"]]), 1e-5)
    rc = main([*argv, "--calibration", str(other), str(other), str(other), "--quiet", "--overwrite"])
    assert rc == 2 and "3 calibration texts for 2 models" in capsys.readouterr().err
