"""Adapter fusion against PEFT's own merging (``add_weighted_adapter``), float64 references, bad inputs.

Where docs/fusion.md claims an equality with a PEFT combination type, the test runs PEFT's real
``add_weighted_adapter`` on a tiny llama and compares the dense updates with ours and with a
float64 reference. Also: the real fusion benchmark's tasks and its shared-context ARC scorer.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from loraport import FusionError, LoraportError, fuse
from loraport.adapters import load_adapter
from loraport.cli import main
from loraport.fusion import FUSION_METHODS, fuse_adapters


def _peft_merge(base, adapters: dict, combination: str, weights: list[float], **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Dense updates (float64) of PEFT's ``add_weighted_adapter`` on ``base`` holding ``adapters``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    names = list(adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base)), str(adapters[names[0]]), names[0]
        )
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        model.add_weighted_adapter(names, weights, "merged", combination, **kwargs)
    out = {}
    for module_name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "merged" in layer.lora_A:
            A = layer.lora_A["merged"].weight.double()
            B = layer.lora_B["merged"].weight.double()
            out[module_name.removeprefix("base_model.model.")] = layer.scaling["merged"] * (B @ A)
    return out


def _ours(adapter) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: m.delta(torch.float64) for n, m in adapter.modules.items()}


def _reference(paths: list, weight: float) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """``weight * sum_i s_i B_i A_i`` in float64."""
    loaded = [load_adapter(p) for p in paths]
    return {n: weight * sum(ad.modules[n].delta(torch.float64) for ad in loaded) for n in loaded[0].modules}


def test_task_arithmetic_is_peft_cat_and_the_float64_sum(zoo) -> None:
    a = zoo.adapter("peft-a", zoo.llama, r=4, seed=1, alpha=8)
    b = zoo.adapter("peft-b", zoo.llama, r=4, seed=2, alpha=4)
    ours = _ours(fuse_adapters(a, b, method="task_arithmetic", scaling=0.7, progress=False).adapter)
    peft = _peft_merge(zoo.llama, {"a": a, "b": b}, "cat", [0.7, 0.7])
    reference = _reference([a, b], 0.7)
    assert set(ours) == set(peft) == set(reference)
    for name, expected in reference.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(peft[name], expected, rtol=1e-5, atol=1e-7)


def test_truncated_task_arithmetic_is_peft_svd_and_the_float64_truncated_svd(zoo) -> None:
    a = zoo.adapter("peft-a", zoo.llama, r=4, seed=1, alpha=8)
    b = zoo.adapter("peft-b", zoo.llama, r=4, seed=2, alpha=4)
    ours = _ours(fuse_adapters(a, b, method="task_arithmetic", rank=3, progress=False).adapter)
    peft = _peft_merge(zoo.llama, {"a": a, "b": b}, "svd", [1.0, 1.0], svd_rank=3)
    for name, total in _reference([a, b], 1.0).items():
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        expected = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(ours[name], expected, rtol=1e-4, atol=1e-6)
        # PEFT runs its SVD in float32: equal to float32 round-off of the largest entry
        torch.testing.assert_close(peft[name], expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_different_ranks_and_rank_patterns_fuse_exactly(zoo) -> None:
    a = zoo.adapter("rank-a", zoo.llama, r=4, seed=3, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 3})
    b = zoo.adapter("rank-b", zoo.llama, r=8, seed=4, alpha=4)
    first = load_adapter(a)
    assert {m.rank for n, m in first.modules.items() if n.endswith("q_proj")} == {2}
    ours = _ours(fuse_adapters(a, b, method="task_arithmetic", progress=False).adapter)
    for name, expected in _reference([a, b], 1.0).items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-7)
    # PEFT's cat takes different ranks too (its linear does not): the same sum.
    peft = _peft_merge(zoo.llama, {"a": a, "b": b}, "cat", [1.0, 1.0])
    for name, expected in _reference([a, b], 1.0).items():
        torch.testing.assert_close(peft[name], expected, rtol=1e-5, atol=1e-7)


def test_loras_of_different_bases_are_a_one_line_error(zoo, tmp_path, capsys) -> None:
    out = tmp_path / "never"
    with pytest.raises(LoraportError, match="LoRAs of different base models") as info:
        fuse(zoo.llama_adapter, zoo.qwen2_adapter, out, method="ties")
    assert "\n" not in str(info.value) and not out.exists()
    gpt2 = zoo.gpt2_adapter  # other module names: nothing in common, even when told the bases match
    with pytest.raises(FusionError, match="no module in common"):
        fuse(zoo.llama_adapter, gpt2, out, method="task_arithmetic", allow_mismatch=True)
    argv = ["fuse", "--models", str(zoo.llama_adapter), str(gpt2), "--out", str(out), "--method", "tsv", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()


def test_adapter_and_model_inputs_do_not_mix(zoo, tmp_path) -> None:
    with pytest.raises(FusionError, match="fuse inputs of one kind"):
        fuse(zoo.llama_adapter, zoo.llama, tmp_path / "x")


def test_real_fusion_tasks_have_disjoint_balanced_splits() -> None:
    from loraport.pretrained.fusion_tasks import ANTONYMS, json_task, smallest_task

    words = [w for pair in ANTONYMS for w in pair]
    assert len(words) == len(set(words)), "a word in two pairs would have two right answers"
    for task in (smallest_task(), json_task()):
        questions = {split: {r["question"] for r in getattr(task, split)} for split in ("train", "dev", "eval")}
        assert not questions["train"] & questions["eval"] and not questions["dev"] & questions["eval"]
        assert not questions["train"] & questions["dev"]
        keys = [r["answerKey"] for r in task.eval]
        assert max(keys.count(k) for k in "ABCD") - min(keys.count(k) for k in "ABCD") <= 1
    for record in smallest_task().eval:
        numbers = [int(x) for x in record["choices"]["text"]]
        assert record["choices"]["text"][record["choices"]["label"].index(record["answerKey"])] == str(min(numbers))
    trained = {w for r in json_task().train for w in r["question"].split('"')[1:2]}
    held_out = {w for r in json_task().eval for w in r["question"].split('"')[1:2]}
    assert not trained & held_out


def test_shared_context_scores_are_the_evaluators(tmp_path) -> None:
    from loraport.evaluate import choice_scores, load_model
    from loraport.pretrained.scoring import correct, shared_context_scores
    from loraport.zoo.corpus import build_tokenizer, vocabulary
    from loraport.zoo.tasks import addition_task, facts_task
    from loraport.zoo.tiny import make_tiny_model

    tokenizer = build_tokenizer()
    model = load_model(make_tiny_model("llama", tmp_path / "m", seed=3, vocab=len(vocabulary()), layers=2))
    records = facts_task(0, people=6).eval[:12] + addition_task(0, n_eval=12).eval
    ours = shared_context_scores(model, tokenizer, records, batch_size=5)
    reference = choice_scores(model, tokenizer, records, progress=False)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-4)
    assert correct(records, ours) == correct(records, reference)


def test_default_method_is_chosen_by_input_kind(zoo, tmp_path) -> None:
    from loraport.fusion.options import DEFAULTS

    a = zoo.adapter("peft-a", zoo.llama, r=4, seed=1, alpha=8)
    b = zoo.adapter("peft-b", zoo.llama, r=4, seed=2, alpha=4)
    method, scaling = DEFAULTS["adapter"]
    auto = fuse(a, b, progress=False)
    assert auto.report.method == method and auto.report.options["scaling"] == scaling
    explicit = fuse_adapters(a, b, method=method, scaling=scaling, progress=False)
    for name, module in auto.adapter.modules.items():
        torch.testing.assert_close(module.delta(torch.float64), explicit.adapter.modules[name].delta(torch.float64))
    # a method given without a scaling keeps scaling 1
    assert fuse(a, b, method="tsv", progress=False).report.options["scaling"] == 1.0
    model_method, model_scaling = DEFAULTS["model"]
    if FUSION_METHODS[model_method].needs_base:  # task-vector default: needs the base
        with pytest.raises(FusionError, match="needs the common base model C"):
            fuse(zoo.llama, zoo.llama_derivative, tmp_path / "m")
        assert not (tmp_path / "m").exists()
    other = zoo.perturbed("llama-d2", zoo.llama, 0.1, seed=2)
    models = fuse(zoo.llama_derivative, other, tmp_path / "auto", base=zoo.llama, progress=False)
    assert models.report.method == model_method and models.report.options.get("scaling") == model_scaling
