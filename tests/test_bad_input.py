"""Every kind of bad input gives a one-line error (exit 2 from the CLI) and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport import transfer
from loraport.cli import main
from loraport.errors import AdapterError, CheckpointError, LoraportError


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop whatever building the fixtures printed
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def port_args(adapter: Path, source: Path, target: Path, out: Path, *extra: str) -> list[str]:
    return [
        "transfer",
        "--adapter",
        str(adapter),
        "--source-base",
        str(source),
        "--target-base",
        str(target),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def expect_failure(capsys, tmp_path: Path, args: list[str], message: str) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loraport: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    return lines[0]


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_adapter_directory(zoo, tmp_path, capsys) -> None:
    expect_failure(
        capsys,
        tmp_path,
        port_args(tmp_path / "nope", zoo.llama, zoo.llama, tmp_path / "out"),
        "adapter directory not found",
    )


def test_missing_adapter_files(zoo, tmp_path, capsys) -> None:
    adapter = copy_dir(zoo.llama_adapter, tmp_path / "a")
    (adapter / "adapter_model.safetensors").unlink()
    expect_failure(
        capsys,
        tmp_path,
        port_args(adapter, zoo.llama, zoo.llama, tmp_path / "out"),
        "missing adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").unlink()
    expect_failure(
        capsys, tmp_path, port_args(adapter, zoo.llama, zoo.llama, tmp_path / "out"), "adapter_config.json: missing"
    )


def test_missing_base_model(zoo, tmp_path, capsys) -> None:
    expect_failure(
        capsys,
        tmp_path,
        port_args(zoo.llama_adapter, tmp_path / "no-base", zoo.llama, tmp_path / "out"),
        "model directory not found",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    expect_failure(
        capsys, tmp_path, port_args(zoo.llama_adapter, zoo.llama, empty, tmp_path / "out"), "no model weights found"
    )


def test_hub_id_not_in_cache_offline(zoo, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    expect_failure(
        capsys,
        tmp_path,
        port_args(zoo.llama_adapter, zoo.llama, "some-org/some-model", tmp_path / "out"),
        "not in the Hugging Face cache",
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_base_safetensors(zoo, tmp_path, capsys, damage: str) -> None:
    base = copy_dir(zoo.llama_derivative, tmp_path / "base")
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00" * 64 if damage == "garbage" else data[: len(data) // 2])
    expect_failure(
        capsys,
        tmp_path,
        port_args(zoo.llama_adapter, zoo.llama, base, tmp_path / "out"),
        "corrupt or truncated safetensors",
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_adapter_safetensors(zoo, tmp_path, capsys, damage: str) -> None:
    adapter = copy_dir(zoo.llama_adapter, tmp_path / "a")
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"{not a header" if damage == "garbage" else data[: len(data) - 100])
    expect_failure(
        capsys, tmp_path, port_args(adapter, zoo.llama, zoo.llama, tmp_path / "out"), "corrupt or truncated safetensors"
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("not json", "not valid JSON"),
        ({"r": -4}, "r must be a positive number"),
        ({"peft_type": "LOHA"}, "peft_type LOHA is not supported"),
        ({"use_dora": True}, "DoRA adapters"),
        ({"bias": "all"}, "train biases"),
        ({"r": 4}, "factors have rank 8 but the config says r=4"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object"),
    ],
)
def test_bad_adapter_config(zoo, tmp_path, capsys, edit, message: str) -> None:
    adapter = copy_dir(zoo.llama_adapter, tmp_path / "a")
    path = adapter / "adapter_config.json"
    if isinstance(edit, str):
        path.write_text(edit)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    expect_failure(capsys, tmp_path, port_args(adapter, zoo.llama, zoo.llama, tmp_path / "out"), message)


def test_modules_to_save_needs_drop_unsupported(zoo, tmp_path, capsys) -> None:
    adapter = copy_dir(zoo.llama_adapter, tmp_path / "a")
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "modules_to_save": ["lm_head"]}))
    state = load_file(str(adapter / "adapter_model.safetensors"))
    state["base_model.model.lm_head.weight"] = torch.zeros(128, 64)
    save_file(state, str(adapter / "adapter_model.safetensors"))
    expect_failure(capsys, tmp_path, port_args(adapter, zoo.llama, zoo.llama, tmp_path / "out"), "--drop-unsupported")
    code, _, err = run_cli(
        capsys,
        *port_args(
            adapter,
            zoo.llama,
            zoo.llama,
            tmp_path / "out",
            "--drop-unsupported",
            "--method",
            "identity",
            "--report",
            str(tmp_path / "r.json"),
        ),
    )
    assert code == 0, err
    assert "base_model.model.lm_head.weight" in json.loads((tmp_path / "r.json").read_text())["dropped"]


def test_adapter_that_does_not_fit_the_source_base(zoo, tmp_path, capsys) -> None:
    # An adapter trained on qwen2 (hidden 64, 4 layers) declared as coming from gemma2 (hidden 96).
    expect_failure(
        capsys,
        tmp_path,
        port_args(zoo.qwen2_adapter, zoo.gemma2, zoo.gemma2, tmp_path / "out"),
        "adapter does not fit the source base",
    )


def test_target_without_matching_modules(zoo, tmp_path, capsys) -> None:
    # Only gate_proj adapted; GPT-2 has no gated MLP: every module is skipped -> error, nothing written.
    adapter = zoo.adapter("llama-gate-only", zoo.llama, r=4, target_modules=["gate_proj"])
    line = expect_failure(
        capsys,
        tmp_path,
        port_args(adapter, zoo.llama, zoo.gpt2, tmp_path / "out", "--method", "prolora"),
        "every module was skipped",
    )
    assert "has no mlp.gate module" in line


def test_nan_in_adapter(zoo, tmp_path, capsys) -> None:
    adapter = copy_dir(zoo.llama_adapter, tmp_path / "a")
    state = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    state[key][0, 0] = float("nan")
    save_file(state, str(adapter / "adapter_model.safetensors"))
    expect_failure(
        capsys,
        tmp_path,
        port_args(adapter, zoo.llama, zoo.llama, tmp_path / "out"),
        "model.layers.1.mlp.up_proj: lora_B contains NaN or Inf",
    )


def test_inf_in_base_weight(zoo, tmp_path, capsys) -> None:
    base = copy_dir(zoo.llama_derivative, tmp_path / "base")
    state = load_file(str(base / "model.safetensors"))
    state["model.layers.2.self_attn.o_proj.weight"][3, 3] = float("inf")
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    expect_failure(
        capsys,
        tmp_path,
        port_args(zoo.llama_adapter, zoo.llama, base, tmp_path / "out", "--method", "project"),
        "model.layers.2.self_attn.o_proj.weight contains NaN or Inf",
    )


def test_existing_output_is_left_untouched(zoo, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, *port_args(zoo.llama_adapter, zoo.llama, zoo.llama, out))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, *port_args(zoo.llama_adapter, zoo.llama, zoo.llama, out, "--overwrite"))
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()


def test_failure_while_writing_leaves_nothing(zoo, tmp_path, monkeypatch) -> None:
    import importlib

    transfer_module = importlib.import_module("loraport.llm.port")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transfer_module, "save_adapter", broken)
    with pytest.raises(OSError, match="disk full"):
        transfer(zoo.llama_adapter, zoo.llama, zoo.llama, tmp_path / "out", method="identity", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_options(zoo, tmp_path, capsys) -> None:
    args = port_args(zoo.llama_adapter, zoo.llama, zoo.llama, tmp_path / "out")
    expect_failure(capsys, tmp_path, [*args, "--threshold-by-type", "q_proj"], "is not TYPE=NUMBER")
    expect_failure(capsys, tmp_path, [*args, "--layer-map", "0-1"], "is not TARGET:SOURCE")
    expect_failure(capsys, tmp_path, [*args, "--layer-map", "0:9"], "out of range")
    expect_failure(capsys, tmp_path, [*args, "--fallback", "magic"], "unknown method 'magic'")
    expect_failure(capsys, tmp_path, [*args, "--subspace-rank", "0"], "subspace rank must be >= 1")


def test_errors_are_catchable_by_type(zoo, tmp_path) -> None:
    with pytest.raises(AdapterError):
        transfer(tmp_path / "nope", zoo.llama, zoo.llama, progress=False)
    with pytest.raises(CheckpointError):
        transfer(zoo.llama_adapter, tmp_path / "nope", zoo.llama, progress=False)
    assert issubclass(AdapterError, LoraportError)
