"""Model and adapter fusion end to end: invariants, closed forms, output format, bad inputs.

Tiny llama models (hidden 32, fixture ``tiny``) built in a temp dir: a base C and two derivatives A, B
(every matrix moved by 5% of its norm, norms untouched).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.adapters import load_adapter
from loraport.checkpoints import Checkpoint
from loraport.cli import main
from loraport.fusion import FUSION_METHODS, FusionError, fuse, fuse_adapters, iso_c, iso_cts, rgsp_fuse, tsv
from loraport.fusion import baselines as B_
from loraport.fusion.methods import tensor_generator
from loraport.fusion.writer import ShardedWriter
from loraport.zoo.corpus import SPECIAL_TOKENS, build_tokenizer
from loraport.zoo.tiny import make_random_adapter, make_tiny_model, perturb_model

SIZE = dict(hidden=32, intermediate=64, vocab=64)
SELECTED = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny SVDs on a shared 2-core machine are ~300x slower with 2 busy-waiting threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fusion-zoo")
    torch.set_num_threads(1)
    C = make_tiny_model("llama", root / "C", seed=0, **SIZE)
    paths = {
        "root": root,
        "C": C,
        "A": perturb_model(C, root / "A", drift=0.05, seed=1),
        "B": perturb_model(C, root / "B", drift=0.05, seed=2),
    }
    # A word-level tokenizer over the tiny vocabulary (4 specials, the numbers 0-59): RegMean runs text.
    tokenizer = build_tokenizer(SPECIAL_TOKENS + [str(i) for i in range(SIZE["vocab"] - len(SPECIAL_TOKENS))])
    for name in ("C", "A", "B"):
        tokenizer.save_pretrained(str(paths[name]))
    paths["X"] = make_random_adapter(C, root / "X", r=4, alpha=8, seed=0)
    paths["Y"] = make_random_adapter(C, root / "Y", r=2, alpha=4, target_modules=["q_proj", "v_proj"], seed=1)
    return paths


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(path) as ckpt:
        return {k: ckpt.get(k).clone() for k in ckpt.keys()}


def _base_for(method: str, tiny) -> Path | None:
    return tiny["C"] if FUSION_METHODS[method].needs_base else None


def _calibration_for(method: str, tiny) -> dict:
    """RegMean's calibration text (token ids of the tiny vocabulary, as words)."""
    if not FUSION_METHODS[method].calibrated:
        return {}
    path = tiny["root"] / "calibration.txt"
    if not path.exists():
        path.write_text("".join(" ".join(str(3 + (7 * i + j) % 50) for j in range(12)) + "\n" for i in range(8)))
    return {"calibration": path}


# -- invariants ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(FUSION_METHODS))
def test_fuse_self_is_bit_exact_identity(method, tiny, tmp_path):
    """fuse(A, A) == A bit for bit, every method (identical tensors are kept)."""
    result = fuse(
        tiny["A"],
        tiny["A"],
        tmp_path / "out",
        method=method,
        base=_base_for(method, tiny),
        progress=False,
        **_calibration_for(method, tiny),
    )
    a, out = _tensors(tiny["A"]), _tensors(result.output)
    assert out.keys() == a.keys()
    assert all(torch.equal(out[k], a[k]) for k in a)
    assert set(result.report.counts()) == {"identical"}


@pytest.mark.parametrize(
    "method,params,exact",
    [
        ("rgsp", {}, True),
        ("average", {}, True),
        ("task_arithmetic", {"scaling": 0.5}, False),
        ("ties", {"density": 1.0, "scaling": 1.0}, False),
    ],
)
def test_fuse_self_without_the_identical_shortcut(method, params, exact, tiny, tmp_path):
    """The raw formulas: rgsp/average exact; TA at 1/N and TIES at density 1 to float tolerance."""
    result = fuse(
        tiny["A"],
        tiny["A"],
        tmp_path / "out",
        method=method,
        base=_base_for(method, tiny),
        keep_identical=False,
        include=".",
        exclude=None,
        progress=False,
        **params,
    )
    a, out = _tensors(tiny["A"]), _tensors(result.output)
    assert result.report.counts() == {method: len(a)} or method == "rgsp"
    for k in a:
        if exact:
            assert torch.equal(out[k], a[k]), k
        else:
            torch.testing.assert_close(out[k], a[k], rtol=0, atol=1e-6)


def test_rgsp_output_format_loads_and_runs(tiny, tmp_path):
    out = tmp_path / "fused"
    result = fuse(tiny["A"], tiny["B"], out, method="rgsp", shard_size=40_000, progress=False)
    a, fused = _tensors(tiny["A"]), _tensors(out)
    assert fused.keys() == a.keys()
    assert all(fused[k].shape == a[k].shape and fused[k].dtype == a[k].dtype for k in a)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny["A"] / "config.json").read_text())
    assert (out / "generation_config.json").exists() and (out / "loraport_fusion_report.md").exists()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, SIZE["vocab"]) and torch.isfinite(logits).all()

    records = {r.name: r for r in result.report.records}
    assert records[SELECTED].action == "rgsp" and records["model.embed_tokens.weight"].action == "average"
    assert records["model.norm.weight"].action == "identical"
    for r in result.report.method_records():
        assert 0 <= r.lam <= 1 and 0 <= r.d <= 1 and r.gw_converged and r.tau_ortho_norm > 0
        assert r.rank == min(64, *r.shape)
    saved = json.loads((out / "loraport_fusion_report.json").read_text())
    assert {"lam", "d", "s_rel", "h_rel", "tau_proj_norm", "tau_ortho_norm", "seconds"} <= saved["tensors"][0].keys()
    assert [row["layer"] for row in saved["layers"]] == [0, 1]


# regmean's tensors are checked against Grams from an independent forward pass in tests/test_fusion_regmean.py.
@pytest.mark.parametrize("method", [m for m in FUSION_METHODS if m != "regmean"])
def test_each_tensor_gets_the_pure_function(method, tiny, tmp_path):
    """Orchestration wiring: selected tensors = the pure method, the rest averaged."""
    base = _base_for(method, tiny)
    result = fuse(tiny["A"], tiny["B"], tmp_path / "out", method=method, base=base, progress=False)
    a, b, out = _tensors(tiny["A"]), _tensors(tiny["B"]), _tensors(result.output)
    c = _tensors(tiny["C"])
    W_A, W_B, W_C = a[SELECTED], b[SELECTED], c[SELECTED]
    taus = B_.task_vectors([W_A, W_B], W_C)
    expected = {
        "rgsp": lambda: rgsp_fuse(W_A, W_B)[0],
        "average": lambda: B_.average([W_A, W_B]),
        "task_arithmetic": lambda: B_.task_arithmetic([W_A, W_B], W_C, 1.0),
        "ties": lambda: B_.ties([W_A, W_B], W_C, 0.2, 1.0),
        "dare": lambda: B_.dare([W_A, W_B], W_C, 0.5, 1.0, generator=tensor_generator(0, SELECTED)),
        "tsv": lambda: B_.apply_task_vector(W_C, tsv(taus)),
        "iso_c": lambda: B_.apply_task_vector(W_C, iso_c(taus)),
        "iso_cts": lambda: B_.apply_task_vector(W_C, iso_cts(taus)),
    }[method]()
    assert torch.equal(out[SELECTED], expected)
    emb = "model.embed_tokens.weight"
    assert torch.equal(out[emb], (a[emb] + b[emb]) / 2)


def test_rgsp_is_deterministic(tiny, tmp_path):
    first = fuse(tiny["A"], tiny["B"], tmp_path / "one", method="rgsp", progress=False)
    second = fuse(tiny["A"], tiny["B"], tmp_path / "two", method="rgsp", progress=False)
    one, two = _tensors(first.output), _tensors(second.output)
    assert all(torch.equal(one[k], two[k]) for k in one)
    strip = [{k: v for k, v in vars(r).items() if k != "seconds"} for r in first.report.records]
    assert strip == [{k: v for k, v in vars(r).items() if k != "seconds"} for r in second.report.records]


def test_output_dtype_follows_a_per_tensor(tiny, tmp_path):
    a_bf16 = tmp_path / "A-bf16"
    a_bf16.mkdir()
    shutil.copy(tiny["A"] / "config.json", a_bf16 / "config.json")
    state = load_file(str(tiny["A"] / "model.safetensors"))
    state = {k: (v.to(torch.bfloat16) if "norm" not in k else v) for k, v in state.items()}
    save_file(state, str(a_bf16 / "model.safetensors"), metadata={"format": "pt"})
    result = fuse(a_bf16, tiny["B"], tmp_path / "out", method="rgsp", progress=False)
    out = _tensors(result.output)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in state.items()}
    assert any("dtypes differ" in n for n in result.report.notes)


def test_task_arithmetic_closed_form(tiny, tmp_path):
    """A = C + t1, B = C + t2, scaling 1: every tensor is C + t1 + t2."""
    result = fuse(
        tiny["A"],
        tiny["B"],
        tmp_path / "out",
        method="task_arithmetic",
        base=tiny["C"],
        scaling=1.0,
        include=".",
        exclude=None,
        keep_identical=False,
        progress=False,
    )
    a, b, c, out = _tensors(tiny["A"]), _tensors(tiny["B"]), _tensors(tiny["C"]), _tensors(result.output)
    for k in a:
        torch.testing.assert_close(out[k], c[k] + (a[k] - c[k]) + (b[k] - c[k]), rtol=0, atol=1e-6)


def test_allow_mismatch_keeps_a_and_copies_one_sided_tensors(tiny, tmp_path):
    odd = tmp_path / "B-odd"
    odd.mkdir()
    shutil.copy(tiny["B"] / "config.json", odd / "config.json")
    state = load_file(str(tiny["B"] / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(8, 8)
    state["extra.weight"] = torch.ones(3)
    save_file(state, str(odd / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FusionError, match=r"extra\.weight"):
        fuse(tiny["A"], odd, tmp_path / "no", method="average", progress=False)
    assert not (tmp_path / "no").exists()
    result = fuse(tiny["A"], odd, tmp_path / "out", method="average", allow_mismatch=True, progress=False)
    out, a = _tensors(result.output), _tensors(tiny["A"])
    assert torch.equal(out[SELECTED], a[SELECTED]) and torch.equal(out["extra.weight"], torch.ones(3))
    actions = {r.name: r.action for r in result.report.records}
    assert actions[SELECTED] == "copied_from_a" and actions["extra.weight"] == "copied_from_b"


def test_failure_mid_way_writes_nothing(tiny, tmp_path, monkeypatch):
    import loraport.fusion.models as models

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise FusionError("boom")
        return B_.average([args[1], args[2]]), {}

    monkeypatch.setattr(models, "merge_tensor", broken)
    with pytest.raises(FusionError, match="boom"):
        fuse(tiny["A"], tiny["B"], tmp_path / "out", method="rgsp", progress=False)
    assert list(tmp_path.iterdir()) == []


# -- command line: success and bad inputs -------------------------------------------------


def test_cli_fuse_models(tiny, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "report.json"
    models = ["--models", str(tiny["A"]), str(tiny["B"]), "--base", str(tiny["C"])]
    rc = main(["fuse", *models, "--out", str(out), "--method", "ties", "--density", "0.5", "--report", str(report)])
    assert rc == 0
    assert "ties (model)" in capsys.readouterr().out
    saved = json.loads(report.read_text())
    assert saved["options"]["density"] == 0.5 and report.with_suffix(".md").exists()
    assert (out / "model.safetensors.index.json").exists()


def _sharded_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    writer = ShardedWriter(dst, max_shard_bytes=20_000)
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        writer.add(name, tensor)
    writer.close()
    return dst


def _bad_input(kind: str, tiny, tmp: Path) -> tuple[list[str], str]:
    A, B = str(tiny["A"]), str(tiny["B"])
    if kind == "architecture":
        other = make_tiny_model("gpt2", tmp / "gpt2", hidden=32, intermediate=64, vocab=64)
        return [A, str(other)], "different architectures"
    if kind == "shape":
        other = make_tiny_model("llama", tmp / "wide", hidden=32, intermediate=48, vocab=64)
        return [A, str(other)], "shape mismatch: tensor 'model.layers.0.mlp."
    if kind == "missing_shard":
        sharded = _sharded_copy(tiny["B"], tmp / "sharded")
        sorted(sharded.glob("model-*.safetensors"))[1].unlink()
        return [A, str(sharded)], "shard file(s) missing"
    if kind == "corrupt":
        broken = tmp / "corrupt"
        shutil.copytree(tiny["B"], broken)
        data = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
        return [A, str(broken)], "corrupt or truncated safetensors"
    if kind == "no_base":
        return [A, B, "--method", "task_arithmetic"], "needs the common base"
    if kind == "adapter_and_model":
        return [str(tiny["X"]), B], "is a LoRA adapter but the other input is not"
    if kind == "bad_option":
        return [A, B, "--density", "1.5"], "density must be in (0, 1]"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["architecture", "shape", "missing_shard", "corrupt", "no_base", "adapter_and_model", "bad_option"]
)
def test_cli_bad_input_exits_2_and_writes_nothing(kind, tiny, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    args, expected = _bad_input(kind, tiny, inputs)
    # rgsp needs no base, so each input check is reached (a later --method wins)
    argv = ["fuse", "--models", *args[:2], "--out", str(outdir / "fused"), "--quiet", "--method", "rgsp", *args[2:]]
    capsys.readouterr()  # drop what building the inputs printed
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("loraport: error: ") and len(err.strip().splitlines()) == 1
    assert expected in err
    assert list(outdir.iterdir()) == []


def test_cli_existing_output_is_left_untouched(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["fuse", "--models", str(tiny["A"]), str(tiny["B"]), "--out", str(out), "--method", "average", "--quiet"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]


# -- adapters ------------------------------------------------------------------------------


def _deltas(adapter) -> dict[str, torch.Tensor]:
    adapter = adapter if not isinstance(adapter, str | Path) else load_adapter(adapter)
    return {name: m.delta(torch.float64) for name, m in adapter.modules.items()}


def test_fuse_adapters_self_average_is_the_adapter(tiny):
    x = _deltas(tiny["X"])
    copied = fuse_adapters(tiny["X"], tiny["X"], method="average", progress=False)
    assert _deltas(copied.adapter).keys() == x.keys()
    assert all(torch.equal(d, x[k]) for k, d in _deltas(copied.adapter).items())
    recomputed = fuse_adapters(tiny["X"], tiny["X"], method="average", keep_identical=False, progress=False)
    for name, d in _deltas(recomputed.adapter).items():
        torch.testing.assert_close(d, x[name], rtol=1e-5, atol=1e-6)
        assert recomputed.adapter.modules[name].rank == 4  # duplicated directions merged
    assert {r.action for r in recomputed.report.records} == {"average"}


@pytest.mark.parametrize("method,weight", [("average", 0.5), ("task_arithmetic", 1.0)])
def test_fuse_adapters_factored_closed_forms(method, weight, tiny):
    x, y = _deltas(tiny["X"]), _deltas(tiny["Y"])
    result = fuse_adapters(tiny["X"], tiny["Y"], method=method, scaling=1.0, progress=False)
    fused = _deltas(result.adapter)
    assert fused.keys() == x.keys()
    for name, d in fused.items():
        expected = weight * (x[name] + y[name]) if name in y else x[name]
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-6)
    records = {r.name: r for r in result.report.records}
    assert all(records[n].dropped_energy == 0.0 and records[n].out_rank <= 6 for n in y)
    assert all(records[n].action == "copied_from_a" for n in x if n not in y)


def test_fuse_adapters_rank_bound_reports_dropped_energy(tiny):
    x, y = _deltas(tiny["X"]), _deltas(tiny["Y"])
    result = fuse_adapters(tiny["X"], tiny["Y"], rank=2, method="average", progress=False)
    for record in result.report.records:
        if record.action != "average":
            continue
        S = torch.linalg.svdvals((x[record.name] + y[record.name]) / 2)
        expected = float((S[2:] ** 2).sum() / (S**2).sum())
        assert result.adapter.modules[record.name].rank == 2
        assert record.dropped_energy == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("method", ["rgsp", "ties"])
def test_cli_fuse_adapters_loads_in_peft(method, tiny, tmp_path, capsys):
    out = tmp_path / "fused-lora"
    models = ["--models", str(tiny["X"]), str(tiny["Y"])]
    rc = main(["fuse", *models, "--out", str(out), "--method", method, "--rank", "4", "--quiet"])
    assert rc == 0 and "(adapter)" in capsys.readouterr().out
    fused = load_adapter(out)
    assert max(m.rank for m in fused.modules.values()) <= 4
    report = json.loads((out / "loraport_fusion_report.json").read_text())
    fused_rows = [t for t in report["tensors"] if t["action"] == method]
    assert fused_rows and all(t["dropped_energy"] is not None for t in fused_rows)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny["C"])), str(out))
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    # PEFT applies exactly our dW (ranks and alphas, fused and copied modules alike).
    merged = model.merge_and_unload().state_dict()
    base = _tensors(tiny["C"])
    for name, delta in _deltas(fused).items():
        key = f"{name}.weight"
        torch.testing.assert_close(merged[key].double() - base[key].double(), delta, rtol=1e-4, atol=1e-6)


# -- N >= 2 inputs, the subspace methods end to end, rgsp's extrapolation note --------------------


def test_cli_fuses_three_models_with_tsv(tiny, tmp_path, capsys):
    third = perturb_model(tiny["C"], tmp_path / "D", drift=0.05, seed=3)
    out, report = tmp_path / "out", tmp_path / "report.json"
    argv = ["fuse", "--models", str(tiny["A"]), str(tiny["B"]), str(third), "--base", str(tiny["C"])]
    rc = main([*argv, "--method", "tsv", "--scaling", "0.8", "--out", str(out), "--report", str(report), "--quiet"])
    assert rc == 0 and "tsv (model)" in capsys.readouterr().out
    fused, c = _tensors(out), _tensors(tiny["C"])
    taus = [_tensors(p)[SELECTED] - c[SELECTED] for p in (tiny["A"], tiny["B"], third)]
    torch.testing.assert_close(fused[SELECTED], c[SELECTED] + 0.8 * tsv(taus))
    saved = json.loads(report.read_text())
    assert len(saved["inputs"]) == 3 and saved["options"]["scaling"] == 0.8 and "density" not in saved["options"]


def test_rgsp_takes_two_models_only(tiny, tmp_path, capsys):
    argv = ["fuse", "--models", str(tiny["A"]), str(tiny["B"]), str(tiny["C"]), "--out", str(tmp_path / "o")]
    rc = main([*argv, "--method", "rgsp", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "rgsp is defined for 2 models" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_rgsp_report_says_when_it_extrapolates_past_b(tiny, tmp_path):
    seed_default = fuse(tiny["A"], tiny["B"], tmp_path / "g1", method="rgsp", progress=False)
    note = [n for n in seed_default.report.notes if n.startswith("extrapolation:")]
    assert note and "position 1.50" in note[0] and "past B" in note[0] and "gamma = 1" in note[0]
    assert "past B" in seed_default.report.summary()
    average_like = fuse(tiny["A"], tiny["B"], tmp_path / "g0", method="rgsp", gamma=0.0, progress=False)
    assert not any(n.startswith("extrapolation:") for n in average_like.report.notes)


def test_three_adapters_in_core_space_match_the_dense_method(tiny, tmp_path):
    from loraport.fusion.subspace_merge import iso_cts

    z = make_random_adapter(tiny["C"], tmp_path / "Z", r=3, alpha=3, seed=2)
    result = fuse_adapters(tiny["X"], tiny["Y"], more=[z], method="iso_cts", progress=False)
    x, y, zd = _deltas(tiny["X"]), _deltas(tiny["Y"]), _deltas(z)
    fused = _deltas(result.adapter)
    for name in y:  # in all three adapters: core size 4 + 2 + 3
        expected = iso_cts([x[name], y[name], zd[name]], dim=9)
        torch.testing.assert_close(fused[name], expected, rtol=1e-4, atol=1e-6)
    for name in set(x) - set(y):  # in X and Z only: fused between those two (core size 7)
        torch.testing.assert_close(fused[name], iso_cts([x[name], zd[name]], dim=7), rtol=1e-4, atol=1e-6)
    assert {r.action for r in result.report.records} == {"iso_cts"}
    with pytest.raises(FusionError, match="rgsp is defined for 2 adapters"):
        fuse_adapters(tiny["X"], tiny["Y"], more=[z], method="rgsp", progress=False)
