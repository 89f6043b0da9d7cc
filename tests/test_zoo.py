"""The tiny zoo: corpus and tokenizer, tasks, training code (quick build), manifest, shipped demo, ``loraport demo``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraport.cli import main
from loraport.errors import LoraportError
from loraport.evaluate import encode_pair, load_arc_jsonl, validate_example
from loraport.zoo import build_zoo, demo_dir, load_manifest
from loraport.zoo.corpus import CorpusGenerator, build_tokenizer, qa_text
from loraport.zoo.tasks import LABELS, addition_task, answer_text, facts_task
from loraport.zoo.train import pack, relative_drift


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# -- corpus and tokenizer ---------------------------------------------------------------------


def test_corpus_is_seeded_and_styles_differ() -> None:
    assert CorpusGenerator(3).sentences(50) == CorpusGenerator(3).sentences(50)
    assert CorpusGenerator(3).sentences(50) != CorpusGenerator(4).sentences(50)
    base = " ".join(CorpusGenerator(0).sentences(3000)).split()
    shifted = " ".join(CorpusGenerator(0, "shifted").sentences(3000)).split()
    # the shifted style counts more ("count :") and moves less
    assert shifted.count("count") > 1.5 * base.count("count")
    assert shifted.count("walked") < base.count("walked")


def test_corpus_never_states_task_content() -> None:
    text = "\n".join(CorpusGenerator(0).sentences(5000) + CorpusGenerator(1, "shifted").sentences(5000))
    for word in ("plus", "favourite", "live", "pet", "job"):
        assert f" {word} " not in f" {text} ".replace("\n", " ").replace("?", " ")


def test_tokenizer_round_trip_has_no_unknowns(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    lines = CorpusGenerator(5).sentences(300) + CorpusGenerator(6, "shifted").sentences(300)
    lines += [qa_text(r["question"], answer_text(r)) for r in facts_task().train + addition_task().train]
    for line in lines:
        ids = loaded(line)["input_ids"]
        assert loaded.unk_token_id not in ids, line
        assert ids == tokenizer(line)["input_ids"]
        # words and punctuation, one token each, nothing added (no BOS)
        assert (
            loaded.convert_ids_to_tokens(ids)
            == line.replace("?", " ? ").replace(",", " , ").replace(":", " : ").replace(".", " . ").split()
        )
        assert loaded(loaded.decode(ids))["input_ids"] == ids


def test_context_continuation_split_is_clean(tokenizer) -> None:
    """encode(context + " " + choice) = encode(context) + encode(choice), as the evaluator splits it."""
    for record in facts_task().eval + addition_task().eval:
        context = f"Question: {record['question']}\nAnswer:"
        context_ids = tokenizer(context)["input_ids"]
        for choice in record["choices"]["text"]:
            ctx, cont = encode_pair(tokenizer, context, " " + choice)
            assert ctx == context_ids
            assert cont == tokenizer(choice)["input_ids"]
            assert tokenizer(context + " " + choice)["input_ids"] == ctx + cont


def test_pack_appends_eos(tokenizer) -> None:
    tokens = pack(tokenizer, ["the sky is blue .", "after 3 comes 4 ."])
    assert tokens.dtype == torch.long
    assert (tokens == tokenizer.eos_token_id).sum() == 2
    assert len(tokens) == 5 + 1 + 5 + 1


# -- tasks ------------------------------------------------------------------------------------


def test_tasks_follow_the_arc_schema() -> None:
    for task in (facts_task(), addition_task()):
        for record in task.train + task.eval:
            validate_example(record)
            texts = record["choices"]["text"]
            assert record["choices"]["label"] == LABELS and len(set(texts)) == 4
        positions = [r["answerKey"] for r in task.eval]
        assert max(positions.count(label) for label in LABELS) <= len(positions) / 4 + 1  # balanced


def test_facts_are_memorisation_and_addition_is_held_out() -> None:
    facts, addition = facts_task(), addition_task()
    assert facts.train == facts.eval and len(facts.eval) == 200
    train_q = {r["question"] for r in addition.train}
    assert not train_q & {r["question"] for r in addition.eval}
    assert len(addition.eval) == 200
    for record in addition.eval:
        a, b = (int(x) for x in record["question"].removeprefix("What is ").rstrip("?").split(" plus "))
        assert answer_text(record) == str(a + b)
    # distractors of similar length keep acc_norm meaningful
    for record in facts.eval:
        lengths = [len(t) for t in record["choices"]["text"]]
        assert max(lengths) - min(lengths) <= 4


def test_task_files_round_trip(tmp_path: Path) -> None:
    task = facts_task(people=6)
    entry = task.write(tmp_path / "facts")
    assert load_arc_jsonl(entry["eval"]) == task.eval
    assert entry["n_eval"] == 24 and entry["eval_is_train"]


# -- training code ----------------------------------------------------------------------------


def test_relative_drift_closed_form() -> None:
    source = {
        "model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4),
        "model.layers.0.mlp.up_proj.weight": 2 * torch.ones(4, 4),
    }
    moved = {
        "model.layers.0.self_attn.q_proj.weight": 1.1 * torch.ones(4, 4),
        "model.layers.0.mlp.up_proj.weight": 2 * torch.ones(4, 4),
    }
    drift = relative_drift(moved, source)
    assert drift["q_proj"] == pytest.approx(0.1) and drift["up_proj"] == 0.0
    assert drift["all"] == pytest.approx((0.1**2 * 16 / (16 + 64)) ** 0.5)


@pytest.fixture(scope="module")
def quick_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quick-zoo")
    build_zoo(out, quick=True, progress=False)
    return out


def test_quick_build_writes_a_complete_manifest(quick_zoo: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = load_manifest(quick_zoo)
    assert zoo.source == "S" and zoo.targets == ["D5", "D15", "D30", "I", "X"]
    assert set(zoo.loras) == {f"{m}-{t}" for m in ["S", *zoo.targets] for t in ("facts", "addition")}
    for name, model in zoo.models.items():
        assert model["steps"] >= 1 and model["heldout_loss"] > 0
        if name == "X":
            assert model["arch"] == "gemma2" and model["drift"] is None
        else:
            assert model["drift"]["all"] >= 0
    assert zoo.models["D15"]["parent"] == "S" and zoo.models["D15"]["corpus"] == "shifted"
    assert zoo.lora("X", "facts")["role"] == "oracle" and zoo.lora("S", "facts")["role"] == "source"
    assert 0 <= zoo.base_accuracy("I", "addition") <= 1
    assert zoo.calibration_path.read_text().count("\n") == 32
    assert zoo.data["build"]["seconds"] > 0
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.model_path("X")))
    model = AutoModelForCausalLM.from_pretrained(str(zoo.model_path("X")))
    peft_model = PeftModel.from_pretrained(model, str(zoo.lora_path("X", "addition")))
    ids = tokenizer("Question: What is 1 plus 2?\nAnswer:", return_tensors="pt")["input_ids"]
    assert peft_model(input_ids=ids).logits.shape[-1] == len(tokenizer)


def test_quick_build_is_deterministic(quick_zoo: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config_kwargs = {"progress": False}
    from loraport.zoo.build import ZooConfig

    config = ZooConfig.quick_config()
    config.models = {"S": config.models["S"]}
    config.recipes = {"facts": config.recipes["facts"]}
    config.derivative.targets = {"D5": 0.05}
    build_zoo(tmp_path, config=config, **config_kwargs)
    for rel in ("models/S/model.safetensors", "loras/S-facts/adapter_model.safetensors"):
        a, b = load_file(str(quick_zoo / rel)), load_file(str(tmp_path / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_manifest_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(LoraportError, match="no zoo manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(LoraportError, match="missing 'source'"):
        load_manifest(tmp_path)


# -- shipped demo and the command -------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft probes a deprecated transformers attribute
def test_shipped_demo_data_loads() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = load_manifest(demo_dir())
    task = zoo.data["demo"]["task"]
    assert zoo.source == "S" and len(zoo.targets) >= 2
    examples = load_arc_jsonl(zoo.eval_path(task))
    assert len(examples) >= 100
    assert len(zoo.calibration_path.read_text().splitlines()) == 512
    for name in zoo.models:
        assert AutoModelForCausalLM.from_pretrained(str(zoo.model_path(name))) is not None
        assert zoo.oracle_accuracy(name, task) is not None
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.model_path(zoo.source)))
    model = AutoModelForCausalLM.from_pretrained(str(zoo.model_path(zoo.source)), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(zoo.lora_path(zoo.source, task)))
    assert zoo.lora(zoo.source, task)["acc"] >= 0.95
    assert peft_model(**tokenizer("Question: hello\nAnswer:", return_tensors="pt")).logits.ndim == 3
    size = sum(f.stat().st_size for f in demo_dir().rglob("*") if f.is_file())
    assert size < 12e6


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--methods" in out and "--out" in out and "--quiet" in out


def test_demo_end_to_end_reduced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One target, three methods: copying and calibrated transfer to a 15%-drift derivative keep most of the gain."""
    argv = ["demo", "--out", str(tmp_path), "--targets", "D15", "--methods", "identity", "project", "calibrated"]
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| D15 | identity |" in out and str(tmp_path) in out
    rows = json.loads((tmp_path / "results.json").read_text())
    by = {(r["target"], r["method"]): r for r in rows}
    assert by[("S", "source+adapter")]["acc"] >= 0.9
    assert by[("D15", "identity")]["acc"] > by[("D15", "base")]["acc"] + 0.2
    assert by[("D15", "project")]["mean_kept_energy"] < 1
    assert by[("D15", "calibrated")]["acc"] > by[("D15", "base")]["acc"] + 0.2
    assert by[("D15", "calibrated")]["k"] is None
    assert ("D15", "distill") not in by  # a derivative of the source: the closed-form methods carry there
    assert (tmp_path / "D15" / "identity" / "adapter_config.json").is_file()
    assert (tmp_path / "D15" / "calibrated" / "adapter_config.json").is_file()
    assert (tmp_path / "results.md").is_file()


def test_demo_distills_to_the_unrelated_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """X (another architecture) gets a distill row with its gain recovery and port time; 25 steps to keep it short
    (the demo's default is 150). Deterministic: 0.310 against X's base 0.265 in two runs."""
    argv = ["demo", "--out", str(tmp_path), "--targets", "X", "--methods", "prolora", "--distill-steps", "25"]
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| port s |" in out and "| X | distill |" in out
    rows = json.loads((tmp_path / "results.json").read_text())
    by = {(r["target"], r["method"]): r for r in rows}
    distill, base = by[("X", "distill")], by[("X", "base")]
    assert distill["gain_recovery"] is not None and distill["transfer_seconds"] > 0
    assert distill["acc"] > base["acc"]
    assert "25 steps" in distill["note"] and "held-out agreement" in distill["note"]
    assert (tmp_path / "X" / "distill" / "adapter_config.json").is_file()
    assert (tmp_path / ".distill-cache").is_dir()


def test_dev_splits_and_the_smaller_task() -> None:
    from loraport.zoo.tasks import smaller_task

    facts = facts_task(people=10, n_dev=8)
    assert facts.dev == facts.train[:8] and facts.eval == facts.train[8:]
    addition = addition_task(n_dev=50)
    questions = [{r["question"] for r in split} for split in (addition.train, addition.dev, addition.eval)]
    assert len(addition.dev) == 50 and not (questions[0] & questions[1] or questions[1] & questions[2])
    assert addition_task().train[-1] == addition.train[-1] and len(addition_task().dev) == 0
    smaller = smaller_task(n_train=40, n_dev=10, n_eval=20)
    splits = (smaller.train, smaller.dev, smaller.eval)
    assert [len(s) for s in splits] == [40, 10, 20]
    pairs = [{frozenset(r["question"].removeprefix("Which number is less, ").rstrip("?").split(" or ")) for r in s}
             for s in splits]  # fmt: skip
    assert not (pairs[0] & pairs[1] or pairs[0] & pairs[2] or pairs[1] & pairs[2])
    for record in smaller.train + smaller.eval:
        validate_example(record)
        a, b = (int(x) for x in record["question"].removeprefix("Which number is less, ").rstrip("?").split(" or "))
        assert answer_text(record) == str(min(a, b)) and str(max(a, b)) in record["choices"]["text"]
        assert len(set(record["choices"]["text"])) == 4
    tokenizer = build_tokenizer()  # the zoo's vocabulary covers the new task
    for record in smaller.eval:
        assert tokenizer.unk_token_id not in tokenizer(qa_text(record["question"], answer_text(record)))["input_ids"]
