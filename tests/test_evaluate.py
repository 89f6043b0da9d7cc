"""ARC evaluator: schema checks, closed-form scores, an unbatched float64 reference, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loraport.cli import main
from loraport.errors import LoraportError
from loraport.evaluate import (
    EvalResult,
    choice_scores,
    encode_pair,
    evaluate,
    evaluate_path,
    load_arc_jsonl,
    load_model,
    load_tokenizer,
)

BOS, EOS = 1, 2


def arc(question: str, texts: list[str], answer: str, labels: list[str] | None = None) -> dict:
    labels = labels or list("ABCDEFGH"[: len(texts)])
    return {"id": question[:8], "question": question, "choices": {"text": texts, "label": labels}, "answerKey": answer}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared CPU: a second OpenMP thread only adds contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- schema -----------------------------------------------------------------------------


def test_load_valid_and_limit(tmp_path: Path) -> None:
    records = [arc(f"q{i}?", ["a", "bb", "ccc"], "B") for i in range(5)]
    path = write_jsonl(tmp_path / "ok.jsonl", [records[0], "", *records[1:]])
    assert load_arc_jsonl(path) == records
    assert load_arc_jsonl(path, limit=2) == records[:2]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps({"question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}), "answerKey"),
        (json.dumps(arc("q?", ["a", "b"], "C")), "answerKey 'C' is not one of the choice labels"),
        (json.dumps(arc("q?", ["a", "b"], "1", ["1", "2"]) | {"answerKey": 1}), "answerKey 1 is not one"),
        (json.dumps(arc("q?", ["a", "b"], "A") | {"choices": {"text": ["a", "b"], "label": ["A"]}}), "2 texts but 1"),
        (json.dumps(arc("q?", ["a", ""], "A")), "non-empty string"),
        (json.dumps(arc("q?", ["a", "b"], "A") | {"choices": ["a", "b"]}), "'choices' must be an object"),
        (json.dumps(arc("q?", ["a", "b"], "A", ["A", "A"])), "distinct"),
    ],
)
def test_schema_errors_name_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [arc("fine?", ["x", "y"], "A"), line])
    with pytest.raises(LoraportError) as info:
        load_arc_jsonl(path)
    assert f"{path} line 2" in str(info.value)
    assert expected in str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(LoraportError, match="no such data file"):
        load_arc_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(LoraportError, match="no questions"):
        load_arc_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]))


# -- closed form: a bigram stub model over a character tokenizer --------------------------


class CharTokenizer:
    """Token = 3 + code point; ``encode`` prepends BOS unless ``add_special_tokens=False``."""

    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, 0
    model_max_length = 10**30

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [3 + ord(c) for c in text]

    def decode(self, token_id: int) -> str:
        specials = {0: "<pad>", BOS: "<s>", EOS: "</s>"}
        return specials[token_id] if token_id in specials else chr(token_id - 3)


class BigramModel(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: the next-token distribution depends on the last token only."""

    def __init__(self, table: torch.Tensor, max_length: int = 512) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.config = SimpleNamespace(max_position_embeddings=max_length)
        self.widths: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        assert input_ids.shape[1] <= self.config.max_position_embeddings
        self.widths.append(input_ids.shape[1])
        return SimpleNamespace(logits=self.table[input_ids])


def bigram_reference(table: torch.Tensor, question: str, choice: str) -> float:
    """log P(" " + choice | "Question: ...\\nAnswer:") under the bigram table, in float64."""
    logp = torch.log_softmax(table.double(), dim=-1)
    context = [BOS] + [3 + ord(c) for c in f"Question: {question}\nAnswer:"]
    continuation = [3 + ord(c) for c in " " + choice]
    previous = [context[-1], *continuation[:-1]]
    return sum(float(logp[p, t]) for p, t in zip(previous, continuation, strict=True))


def test_closed_form_acc_and_acc_norm() -> None:
    """Uniform next characters (cost log V each) after a cheaper space (cost log V / 2 after ':').

    score(choice) = -(1/2 + n) log V for a choice of n characters, so acc picks the shortest
    (first of ties, like np.argmax) and acc_norm = score / n picks the longest; dividing by
    len(" " + choice) = n + 1 instead would pick the shortest again.
    """
    vocab = 300
    table = torch.zeros(vocab, vocab)
    # P(" " | ":") = V ** -0.5 with every other next token equally likely.
    table[3 + ord(":"), 3 + ord(" ")] = math.log((vocab - 1) * vocab**-0.5 / (1 - vocab**-0.5))
    model, tok = BigramModel(table), CharTokenizer()
    examples = [
        arc("short?", ["abcd", "ab", "abcdefgh", "ab"], "B"),  # acc right (first of the tied shortest)
        arc("long?", ["abcd", "ab", "abcdefgh", "abc"], "C"),  # acc_norm right
        arc("tie?", ["xy", "xy", "xyz"], "C"),  # acc picks A (first tie): wrong; acc_norm right
    ]
    scores = choice_scores(model, tok, examples, progress=False)
    for example, row in zip(examples, scores, strict=True):
        for text, score in zip(example["choices"]["text"], row, strict=True):
            assert score == pytest.approx(-(0.5 + len(text)) * math.log(vocab), rel=1e-6)
    result = evaluate(model, tok, examples, progress=False)
    assert (result.acc, result.acc_norm, result.n) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 3)
    # stderr of the mean of [1, 0, 0]: sample std sqrt(1/3) over sqrt(3) = 1/3
    assert result.acc_stderr == pytest.approx(1 / 3)
    assert result.acc_norm_stderr == pytest.approx(1 / 3)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_bigram_scores_match_hand_computation(batch_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(200, 200, generator=generator) * 3
    # A short window forces lm-eval's left truncation of long contexts; bigram scores do not change.
    model, tok = BigramModel(table, max_length=40), CharTokenizer()
    examples = [
        arc(f"question number {k} about things?", ["red", "a bright green", "blue-ish grey", "ok"], "ABCD"[k % 4])
        for k in range(6)
    ]
    scores = choice_scores(model, tok, examples, batch_size=batch_size, progress=False)
    expected = [[bigram_reference(table, e["question"], t) for t in e["choices"]["text"]] for e in examples]
    for row, ref in zip(scores, expected, strict=True):
        assert row == pytest.approx(ref, abs=1e-4)
    assert max(model.widths) == 40
    acc = [max(range(4), key=lambda i: ref[i]) == k % 4 for k, ref in enumerate(expected)]
    lengths = [len(t) for t in examples[0]["choices"]["text"]]
    acc_norm = [max(range(4), key=lambda i: ref[i] / lengths[i]) == k % 4 for k, ref in enumerate(expected)]
    result = evaluate(model, tok, examples, batch_size=batch_size, progress=False)
    assert result.acc == pytest.approx(sum(acc) / 6)
    assert result.acc_norm == pytest.approx(sum(acc_norm) / 6)


def test_encode_pair_moves_trailing_space_and_bos() -> None:
    tok = CharTokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "x")
    assert (ctx, cont) == encode_pair(tok, "Answer:", " x")
    assert ctx[0] == BOS and cont == [3 + ord(" "), 3 + ord("x")]
    ctx, _ = encode_pair(tok, "Answer:", " x", add_bos_token=False)
    assert ctx[0] != BOS
    ctx, _ = encode_pair(tok, "<s>Answer:", " x")  # already starts with the BOS string: none added
    assert ctx.count(BOS) == 0 and len(ctx) == len("<s>Answer:")


# -- a real tiny Llama with a word-level tokenizer, against an unbatched reference --------


WORDS = ["Question", "Answer", ":", "?", "the", "a", "of", "is", "which", "what"]
WORDS += ["red", "green", "blue", "small", "big", "cat", "dog", "sun", "moon", "tree"]
CHOICES = ["red", "a big green tree", "the sun", "small blue cat dog", "moon", "a dog"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from loraport.zoo.tiny import make_random_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("eval-tiny")
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model_dir = root / "model"
    fast.save_pretrained(str(model_dir))
    make_tiny_model("llama", model_dir, seed=3, vocab=len(fast), initializer_range=0.3)
    adapter_dir = make_random_adapter(model_dir, root / "adapter", r=4, seed=1)
    rng = torch.Generator().manual_seed(0)
    records = []
    for k in range(12):
        picks = torch.randperm(len(CHOICES), generator=rng)[:4].tolist()
        words = " ".join(WORDS[5 + (k * 3 + j) % 14] for j in range(1 + k % 5))
        labels = ["1", "2", "3", "4"] if k % 3 == 0 else ["A", "B", "C", "D"]
        records.append(arc(f"which {words} is ?", [CHOICES[p] for p in picks], labels[k % 4], labels))
    data = write_jsonl(root / "arc.jsonl", records)
    return {"model": model_dir, "adapter": adapter_dir, "data": data, "records": records}


def unbatched_reference(model, tokenizer, records: list[dict]) -> list[list[float]]:
    """Each choice on its own: one unpadded forward of the whole text, float64 log-softmax."""
    out = []
    with torch.no_grad():
        for r in records:
            context = f"Question: {r['question']}\nAnswer:"
            row = []
            for text in r["choices"]["text"]:
                n_context = len(tokenizer(context)["input_ids"])
                whole = tokenizer(context + " " + text)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
                row.append(sum(float(logp[pos - 1, whole[pos]]) for pos in range(n_context, len(whole))))
            out.append(row)
    return out


@pytest.mark.parametrize("with_adapter", [False, True])
def test_batched_matches_unbatched_reference(tiny: dict, with_adapter: bool) -> None:
    model = load_model(tiny["model"], tiny["adapter"] if with_adapter else None)
    tokenizer = load_tokenizer(tiny["model"])
    records = tiny["records"]
    reference = unbatched_reference(model.eval(), tokenizer, records)
    results = {}
    for batch_size in (1, 8):
        scores = choice_scores(model, tokenizer, records, batch_size=batch_size, progress=False)
        for row, ref in zip(scores, reference, strict=True):
            assert row == pytest.approx(ref, abs=1e-4)
        results[batch_size] = evaluate(model, tokenizer, records, batch_size=batch_size, progress=False)
    golds = [r["choices"]["label"].index(r["answerKey"]) for r in records]
    acc = [max(range(4), key=lambda i: ref[i]) == g for ref, g in zip(reference, golds, strict=True)]
    acc_norm = [
        max(range(4), key=lambda i: ref[i] / len(r["choices"]["text"][i])) == g
        for ref, g, r in zip(reference, golds, records, strict=True)
    ]
    assert results[1].acc == results[8].acc == pytest.approx(sum(acc) / len(records))
    assert results[1].acc_norm == results[8].acc_norm == pytest.approx(sum(acc_norm) / len(records))
    assert results[1].acc_stderr == results[8].acc_stderr


def test_evaluate_path_and_adapter_changes_scores(tiny: dict) -> None:
    base = evaluate_path(str(tiny["model"]), str(tiny["data"]), progress=False, limit=5)
    assert isinstance(base, EvalResult) and base.n == 5
    tokenizer = load_tokenizer(tiny["model"])
    with_lora = choice_scores(load_model(tiny["model"], tiny["adapter"]), tokenizer, tiny["records"], progress=False)
    without = choice_scores(load_model(tiny["model"]), tokenizer, tiny["records"], progress=False)
    largest_change = max(
        abs(a - b) for ra, rb in zip(with_lora, without, strict=True) for a, b in zip(ra, rb, strict=True)
    )
    assert largest_change > 1e-2
    with pytest.raises(LoraportError, match="not a PEFT adapter"):
        evaluate_path(str(tiny["model"]), str(tiny["data"]), adapter=str(tiny["data"].parent), progress=False)


# -- CLI --------------------------------------------------------------------------------


def test_cli_json(tiny: dict, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "--model", str(tiny["model"]), "--adapter", str(tiny["adapter"]), "--data", str(tiny["data"])]
    assert main([*argv, "--json", "--quiet", "--batch-size", "4"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert {"acc", "acc_norm", "n"} <= payload.keys() and payload["n"] == len(tiny["records"])
    assert 0.0 <= payload["acc"] <= 1.0 and 0.0 <= payload["acc_norm"] <= 1.0
    assert main([*argv, "--limit", "3", "--quiet"]) == 0
    assert "acc_norm" in capsys.readouterr().out


def test_cli_bad_input_exits_2(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(tiny["model"]), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(tiny["data"])]) == 2
    assert "no-model" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [arc("q?", ["a", "b"], "Z")])
    assert main(["eval", "--model", str(tiny["model"]), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 1" in err and "answerKey 'Z'" in err
