"""Fusion by distillation (``loraport fuse --method distill``): several teachers, one student, any bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraport import fuse
from loraport.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo zoo's S with two adapters of disjoint behaviour (its facts LoRA on the facts questions, a
    random LoRA on plain sentences), a tiny Gemma-3 G (byte-level BPE) with a LoRA of its own, and a third
    base T3 (a tiny Llama with another BPE): prompts for each."""
    import shutil

    from loraport.zoo import demo_dir
    from loraport.zoo.corpus import CorpusGenerator, write_lines
    from loraport.zoo.tiny import make_bpe_tokenizer, make_random_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("fuse-distill")
    zoo_dir = demo_dir()
    S = Path(shutil.copytree(zoo_dir / "models" / "S", root / "S"))
    sentences = CorpusGenerator(11).sentences(200)
    G = make_tiny_model(
        "gemma3_text", root / "G", seed=1, hidden=48, layers=2, heads=2, kv_heads=1, intermediate=96, head_dim=24,
        vocab=300, sliding_window=8,
    )  # fmt: skip
    make_bpe_tokenizer(G, sentences, 300)
    T3 = make_tiny_model("llama", root / "T3", seed=2, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                         vocab=320)  # fmt: skip
    make_bpe_tokenizer(T3, sentences, 320)
    records = [json.loads(line) for line in (zoo_dir / "tasks" / "facts" / "eval.jsonl").read_text().splitlines()]
    lines = [line.strip() for line in (zoo_dir / "calibration.txt").read_text().splitlines() if line.strip()]
    return {
        "S": S,
        "G": G,
        "T3": T3,
        "facts": zoo_dir / "loras" / "S-facts",
        "random": make_random_adapter(S, root / "random", r=4, alpha=32, seed=3),
        "attention": make_random_adapter(
            S, root / "attention", r=4, alpha=16, seed=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
        "mlp": make_random_adapter(
            S, root / "mlp", r=4, alpha=16, seed=5, target_modules=["gate_proj", "up_proj", "down_proj"]
        ),
        "g_lora": make_random_adapter(G, root / "g_lora", r=4, alpha=32, seed=5),
        "facts_prompts": write_lines(
            root / "facts.jsonl", [json.dumps({"prompt": f"Question: {r['question']}\nAnswer:"}) for r in records[:60]]
        ),
        "text_prompts": write_lines(root / "text.txt", [" ".join(line.split()[:6]) for line in lines[:60]]),
        "g_prompts": write_lines(root / "g.txt", [" ".join(s.split()[:5]) for s in sentences[100:160]]),
    }


def _fast(tmp_path: Path, **extra: object) -> dict[str, object]:
    from loraport.distill import DistillOptions

    options = DistillOptions(cache=str(tmp_path / "cache"), eval_every=5, batch_size=8, heldout=0.2,
                             max_new_tokens=4, **extra)  # fmt: skip
    return {"distill": options, "progress": False}


def test_two_teachers_on_one_base_are_both_learned(zoo, tmp_path: Path) -> None:
    """An attention-only and an MLP-only LoRA on their own prompts: the student matches each teacher."""
    result = fuse(
        zoo["attention"], zoo["mlp"], tmp_path / "out", method="distill", bases=[zoo["S"]],
        prompts=[zoo["facts_prompts"], zoo["text_prompts"]], **_fast(tmp_path, steps=120, lr=5e-3),
    )  # fmt: skip
    info = result.report.distill
    assert info["chosen"] == "distilled" and len(info["tasks"]) == 2
    for task in info["tasks"]:  # the student comes close to each teacher on its held-out prompts
        assert task["distilled"]["kl"] < 0.2 * task["start"]["kl"] and task["learned"], task
    assert "start: the target itself (no weight-space merge" in " ".join(result.report.notes)  # disjoint modules
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "loraport_fusion_report.json").is_file()
    history = info["student"]["history"]
    assert {t["task"] for t in history[0]["tasks"]} == {str(zoo["attention"]), str(zoo["mlp"])}


def test_gap_shares_give_the_lagging_teacher_more_of_each_batch(zoo, tmp_path: Path) -> None:
    """``distill_task_shares="gap"``: a teacher the bare target already matches (a near-zero LoRA) gives the
    other, still unlearned, most of each batch after the first check (each share recorded per task)."""
    from loraport.zoo.tiny import make_random_adapter

    faint = make_random_adapter(zoo["S"], tmp_path / "faint", r=4, alpha=1e-4, seed=6,
                                target_modules=["gate_proj", "up_proj", "down_proj"])  # fmt: skip
    result = fuse(
        zoo["attention"], faint, tmp_path / "out", method="distill", bases=[zoo["S"]],
        prompts=[zoo["facts_prompts"], zoo["text_prompts"]],
        **_fast(tmp_path, steps=30, lr=5e-3, task_shares="gap"),
    )  # fmt: skip
    info = result.report.distill
    assert info["tasks"][0]["learned"], info["tasks"]
    history = info["student"]["history"][1:]
    shares = [[t["next_share"] for t in e["tasks"]] for e in history]
    gaps = [[2 - t["heldout_agreement"] - t["probe_agreement"] for t in e["tasks"]] for e in history]
    assert all(sum(s) == 8 and min(s) >= 2 for s in shares), shares
    for share, gap in zip(shares, gaps, strict=True):  # the larger share goes to the larger gap
        assert share[0] == share[1] or (share[0] > share[1]) == (gap[0] > gap[1]), (shares, gaps)
    assert shares[0] == [6, 2], shares  # the faint teacher is matched from the start
    assert info["student"]["history"][0]["tasks"][1]["heldout_agreement"] > 0.9


def test_teachers_of_two_bases_and_tokenizers_fuse_onto_a_third(zoo, tmp_path: Path) -> None:
    result = fuse(
        zoo["facts"], zoo["g_lora"], tmp_path / "out", method="distill", bases=[zoo["S"], zoo["G"]],
        target_base=zoo["T3"], prompts=[zoo["facts_prompts"], zoo["g_prompts"]],
        **_fast(tmp_path, steps=30, lr=1e-2, force=True),
    )  # fmt: skip
    info = result.report.distill
    supports = [t["support"] for t in info["teachers"]]
    assert all("spell the same way" in s for s in supports)  # neither shares T3's tokenizer
    assert result.output is not None and result.adapter.modules
    assert all(name.startswith("model.layers.") for name in result.adapter.modules)
    assert any(t["distilled"]["kl"] < t["start"]["kl"] for t in info["tasks"])
    from tests.helpers import peft_load_and_forward

    assert peft_load_and_forward(zoo["T3"], tmp_path / "out") > 0


def test_auto_writes_the_best_weight_space_merge_when_it_keeps_enough(zoo, tmp_path: Path) -> None:
    merged = fuse(
        zoo["facts"], zoo["random"], tmp_path / "merged", method="auto", bases=[zoo["S"]],
        prompts=[zoo["facts_prompts"], zoo["text_prompts"]], min_kept=0.0, **_fast(tmp_path),
    )  # fmt: skip
    info = merged.report.distill
    assert info["chosen"].startswith("weight-space merge") and len(info["candidates"]["table"]) >= 3
    best = info["candidates"]["best"]
    assert info["candidates"]["table"][best]["worst"] == max(r["worst"] for r in info["candidates"]["table"].values())
    distilled = fuse(
        zoo["facts"], zoo["random"], tmp_path / "distilled", method="auto", bases=[zoo["S"]],
        prompts=[zoo["facts_prompts"], zoo["text_prompts"]], min_kept=1.01, **_fast(tmp_path, steps=5),
    )  # fmt: skip
    assert distilled.report.distill["chosen"] in ("distilled", "start")
    assert distilled.report.distill["student"]["steps"] == 5


def test_bad_fusion_inputs_are_one_line_errors_and_write_nothing(zoo, tmp_path: Path, capsys) -> None:
    base = ["fuse", "--models", str(zoo["facts"]), str(zoo["random"]), "--out", str(tmp_path / "out"),
            "--method", "distill", "--quiet", "--distill-cache", str(tmp_path / "cache")]  # fmt: skip
    two = ["--prompts", str(zoo["facts_prompts"]), str(zoo["text_prompts"])]
    for extra, message in (
        (["--bases", str(zoo["S"])], "needs --prompts"),
        (["--bases", str(zoo["S"]), "--prompts", str(zoo["facts_prompts"])], "1 prompt file(s) for 2 adapters"),
        ([*two], "needs the adapters' bases"),
        ([*two, "--bases", str(zoo["S"]), str(zoo["S"]), str(zoo["S"])], "3 base(s) for 2 adapters"),
        ([*two, "--bases", str(zoo["S"]), str(zoo["G"])], "pass --target-base"),
        ([*two, "--bases", str(zoo["G"])], "does not fit"),
        ([*two, "--bases", str(zoo["S"]), "--synthesize", "1", "2", "3"], "--synthesize"),
        (
            ["--bases", str(zoo["S"]), "--prompts", str(zoo["facts_prompts"]), str(tmp_path / "none.txt")],
            "prompts file not found",
        ),
    ):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (extra, err)
        assert not (tmp_path / "out").exists()
    assert main(["fuse", "--models", str(zoo["facts"]), str(zoo["random"]), "--out", str(tmp_path / "o2"),
                 "--prompts", str(zoo["facts_prompts"]), str(zoo["text_prompts"]), "--method", "ties",
                 "--quiet"]) == 2  # fmt: skip
    assert "are for --method distill" in capsys.readouterr().err


def test_learnt_coefficients_weight_each_adapter_per_layer(zoo, tmp_path: Path) -> None:
    """``--distill-learn coefficients``: one LoRA twice (two teachers that want the same update) starts at twice
    the update; the learnt coefficients move toward summing to 1, and the written adapter is exactly the
    adapters side by side, each layer's block of adapter i times the report's coefficient."""
    import shutil

    from loraport.adapters import load_adapter
    from loraport.distill.coefficients import layer_group

    twin = Path(shutil.copytree(zoo["facts"], tmp_path / "facts-twin"))
    result = fuse(
        zoo["facts"], twin, tmp_path / "out", method="distill", bases=[zoo["S"]],
        prompts=[zoo["facts_prompts"], zoo["facts_prompts"]],
        **_fast(tmp_path, steps=30, learn="coefficients", positions="all"),
    )  # fmt: skip
    info = result.report.distill
    assert info["chosen"] == "distilled", info["tasks"]
    table = info["coefficients"]
    assert set(table) == {layer_group(name) for name in result.adapter.modules}
    sums = [sum(row.values()) for row in table.values()]
    assert sum(sums) / len(sums) < 1.8, table  # from 2 (the start) toward 1
    names = [str(zoo["facts"]), str(twin)]
    sources = [load_adapter(path, base=zoo["S"]) for path in (zoo["facts"], twin)]
    for name, module in result.adapter.modules.items():
        expected = sum(
            table[layer_group(name)][n] * s.modules[name].delta() for n, s in zip(names, sources, strict=True)
        )
        assert torch.allclose(module.delta(), expected, atol=1e-3 * float(expected.abs().max())), name
        assert module.rank == 2 * sources[0].modules[name].rank
    assert "only the coefficients are learnt" in " ".join(result.report.notes)


def test_coefficients_need_adapters_of_the_target_base(zoo, tmp_path: Path, capsys) -> None:
    args = ["fuse", "--models", str(zoo["facts"]), str(zoo["g_lora"]), "--out", str(tmp_path / "out"),
            "--method", "distill", "--quiet", "--distill-cache", str(tmp_path / "cache"), "--distill-learn",
            "coefficients", "--bases", str(zoo["S"]), str(zoo["G"]), "--target-base", str(zoo["S"]),
            "--prompts", str(zoo["facts_prompts"]), str(zoo["g_prompts"])]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "every adapter must be of the target's base" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert main(["transfer", "--adapter", str(zoo["facts"]), "--source-base", str(zoo["S"]), "--target-base",
                 str(zoo["S"]), "--out", str(tmp_path / "t"), "--method", "distill", "--prompts",
                 str(zoo["facts_prompts"]), "--distill-learn", "coefficients", "--quiet"]) == 2  # fmt: skip
    assert "is for fuse --method distill" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert main(["transfer", "--adapter", str(zoo["facts"]), "--source-base", str(zoo["S"]), "--target-base",
                 str(zoo["S"]), "--out", str(tmp_path / "t"), "--method", "distill", "--prompts",
                 str(zoo["facts_prompts"]), "--distill-task-shares", "gap", "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "--distill-task-shares gap is for fuse --method distill" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_a_fusion_that_changes_the_target_more_than_its_inputs_says_so() -> None:
    from loraport.fusion.distilled import _notes

    def info(change: float, owns: dict[str, float | None]) -> dict[str, object]:
        generic = {"text": "docstrings", "perplexity_change": change, "source_perplexity_changes": owns}
        return {"tasks": [], "generic": generic, "chosen": "distilled"}

    loud = [n for n in _notes(info(0.60, {"a": 0.10, "b": 0.30})) if n.startswith("WARNING")]
    assert len(loud) == 1 and "+60.0%" in loud[0] and "at most +30.0%" in loud[0]
    assert not [n for n in _notes(info(0.33, {"a": 0.10, "b": 0.30})) if n.startswith("WARNING")]  # within 5 pts
    assert not [n for n in _notes(info(0.60, {"a": None})) if n.startswith("WARNING")]  # nothing to compare with
