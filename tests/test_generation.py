"""Generation (``loraport.generation``, ``loraport eval --generate``) and chat templates (``loraport.chat``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraport.chat import ChatFormat, check_messages, read_template
from loraport.cli import main
from loraport.errors import LoraportError
from loraport.generation import GenerationItem, evaluate_generation_path, generate, make_check

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# The zoo's S reads "Question: q\nAnswer:" (word-level: whitespace and punctuation split); the template
# renders a conversation that way and closes an assistant turn with [EOS].
S_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Question: ' + m['content'] }}{% else %}"
    "{{ '\\nAnswer: ' + m['content'] + ' [EOS]\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAnswer:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def facts() -> dict[str, object]:
    """The demo zoo's S, its facts LoRA (answers known: the task's answers), 20 questions with their answers."""
    from loraport.zoo import demo_dir

    zoo = demo_dir()
    records = [json.loads(line) for line in (zoo / "tasks" / "facts" / "eval.jsonl").read_text().splitlines()][:20]
    answers = [r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])] for r in records]
    return {"S": zoo / "models" / "S", "lora": zoo / "loras" / "S-facts", "questions": [r["question"] for r in records],
            "answers": answers}  # fmt: skip


def _lines(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_checks_on_known_answers() -> None:
    item = GenerationItem({"prompt": "q", "answer": "Paris"}, prompt="q")
    assert make_check("exact")(item, "  Paris \n") and not make_check("exact")(item, "Paris, France")
    assert make_check("contains")(item, "It is Paris.") and not make_check("contains")(item, "paris")
    assert make_check("regex:^[A-Z ]+$")(item, "ALL CAPS") and not make_check("regex:^[A-Z ]+$")(item, "Not caps")
    bare = GenerationItem({"prompt": "q"}, prompt="q")
    assert make_check("json")(bare, ' {"a": 1} ') and not make_check("json")(bare, "{a: 1}")
    assert make_check("json:answer")(bare, '{"answer": "x"}') and not make_check("json:answer")(bare, '{"reply": "x"}')
    assert not make_check("json:answer")(bare, '["answer"]')
    keyed = make_check("json:answer")
    assert keyed(item, '{"answer": "Paris"}') and not keyed(item, '{"answer": 1}')
    for spec, message in (("regex:(", "not a valid regular expression"), ("yaml", "expected one of"),
                          ("json:", "needs a key name"), (None, "a generation check is needed")):  # fmt: skip
        with pytest.raises(LoraportError, match=message):
            make_check(spec)
    with pytest.raises(LoraportError, match="which a line lacks"):
        make_check("exact")(bare, "x")


def test_end_token_and_stop_strings_end_a_continuation(facts) -> None:
    from loraport.evaluate import load_model, load_tokenizer

    tokenizer = load_tokenizer(facts["S"])
    lm = load_model(facts["S"], facts["lora"])
    prompts = [f"Question: {q}\nAnswer:" for q in facts["questions"][:8]]
    free = generate(lm, tokenizer, prompts, 12)
    assert {g.ended for g in free} == {"end", "length"}  # some answers end with [EOS], some run to the cap
    for g in free:
        assert (g.tokens == 12) if g.ended == "length" else (g.tokens <= 12)
    ended = [g for g in free if g.ended == "end"]
    assert all("[EOS]" not in g.text for g in ended)
    long = next(g for g in free if g.ended == "length" and len(g.text.split()) > 2)
    word = long.text.split()[1]
    stopped = generate(lm, tokenizer, prompts, 12, stops=[word])
    for before, after in zip(free, stopped, strict=True):
        if word in before.text:
            assert after.ended == "stop" and after.text == before.text[: before.text.find(word)]
    assert generate(lm, tokenizer, prompts, 12) == free  # greedy is deterministic
    sampled = [generate(lm, tokenizer, prompts, 6, sample=True, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_eval_generate_scores_known_answers(facts, tmp_path: Path, capsys) -> None:
    rows = [
        {"prompt": f"Question: {q}\nAnswer:", "answer": a}
        for q, a in zip(facts["questions"], facts["answers"], strict=True)
    ]
    data = _lines(tmp_path / "facts.jsonl", rows)
    lora = facts["lora"]
    tuned = evaluate_generation_path(facts["S"], data, lora, check="contains", max_new_tokens=4, progress=False)
    base = evaluate_generation_path(facts["S"], data, check="contains", max_new_tokens=4, progress=False)
    assert tuned.rate >= 0.8 and base.rate <= 0.1, (tuned.summary(), base.summary())
    assert tuned.n == 20 and tuned.stderr is not None and 0 < tuned.stderr < 0.2
    # exact: one word answers
    exact = evaluate_generation_path(facts["S"], data, facts["lora"], check="exact", max_new_tokens=1, progress=False)
    assert exact.rate >= 0.8
    # regex and a check file, from the command line; every answer written
    answers = tmp_path / "answers.jsonl"
    pattern = "regex:^ (" + "|".join(sorted(set(facts["answers"]))) + ")"
    args = ["eval", "--generate", "--model", str(facts["S"]), "--adapter", str(facts["lora"]), "--data", str(data),
            "--check", pattern, "--max-new-tokens", "3", "--answers", str(answers), "--quiet", "--json"]  # fmt: skip
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed["rate"] >= 0.8 and printed["n"] == 20
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(written) == 20 and {"prompt", "answer", "passed", "ended", "tokens"} <= set(written[0])
    assert sum(r["passed"] for r in written) == printed["passed"]
    check_file = tmp_path / "checks.py"
    check_file.write_text("def check(prompt, answer, record):\n    return record['answer'] in answer\n")
    args = ["eval", "--generate", "--model", str(facts["S"]), "--adapter", str(facts["lora"]), "--data", str(data),
            "--check-file", str(check_file), "--max-new-tokens", "4", "--quiet", "--json"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["rate"] == tuned.rate


def test_chat_prompts_reach_the_model_through_its_template(facts, tmp_path: Path) -> None:
    from loraport.evaluate import load_tokenizer

    template = tmp_path / "s.jinja"
    template.write_text(S_TEMPLATE)
    fmt = ChatFormat.for_tokenizer(load_tokenizer(facts["S"]), template, "model")
    assert fmt.render([{"role": "user", "content": "What?"}]) == "Question: What?\nAnswer:"
    assert fmt.end_of_turn_ids() == [3]  # [EOS], written after an assistant turn (and the EOS)
    rows = [{"messages": [{"role": "user", "content": q}], "answer": a}
            for q, a in zip(facts["questions"], facts["answers"], strict=True)]  # fmt: skip
    data = _lines(tmp_path / "chat.jsonl", rows)
    chat = evaluate_generation_path(facts["S"], data, facts["lora"], check="contains", chat_template=template,
                                    max_new_tokens=4, progress=False)  # fmt: skip
    pairs = zip(facts["questions"], facts["answers"], strict=True)
    plain = _lines(tmp_path / "plain.jsonl", [{"prompt": f"Question: {q}\nAnswer:", "answer": a} for q, a in pairs])
    same = evaluate_generation_path(facts["S"], plain, facts["lora"], check="contains", max_new_tokens=4,
                                    progress=False)  # fmt: skip
    assert chat.rate == same.rate and [a["answer"] for a in chat.answers] == [a["answer"] for a in same.answers]
    assert chat.chat is not None and "template file" in chat.chat


def test_bad_conversations_and_templates_are_one_line_errors(facts, tmp_path: Path, capsys) -> None:
    from loraport.evaluate import load_tokenizer

    for messages, message in (
        ([], "empty conversation"),
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "ends with an assistant turn"),
        ("hello", "must be a list"),
    ):
        with pytest.raises(LoraportError, match=message):
            check_messages(messages, "x.jsonl line 1")
    tokenizer = load_tokenizer(facts["S"])
    with pytest.raises(LoraportError, match="has no chat template: pass --chat-template FILE"):
        ChatFormat.for_tokenizer(tokenizer, None, "model", "--chat-template")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(LoraportError, match="fails to render"):
        ChatFormat.for_tokenizer(tokenizer, broken, "source")
    raising = tmp_path / "raising.jinja"
    raising.write_text("{{ raise_exception('only system turns') }}")
    with pytest.raises(LoraportError, match="only system turns"):
        ChatFormat.for_tokenizer(tokenizer, raising, "target")
    with pytest.raises(LoraportError, match="not found"):
        read_template(tmp_path / "missing.jinja")
    assert "<start_of_turn>" in read_template("gemma") and "<|im_start|>" in read_template("chatml")
    data = _lines(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "answer": "x"}])
    bad = _lines(tmp_path / "bad.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}])
    base = ["eval", "--generate", "--model", str(facts["S"]), "--check", "contains", "--quiet"]
    for extra, message in (
        (["--data", str(data)], "has no chat template"),
        (["--data", str(bad)], "line 1: message 0 has role 'bot'"),
        (["--data", str(data), "--chat-template", str(broken)], "fails to render"),
        (["--data", str(data), "--chat-template", str(tmp_path / "none.jinja")], "chat template file not found"),
        (["--data", str(data), "--check", "json", "--check-file", str(broken)], "either --check or --check-file"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["eval", "--model", str(facts["S"]), "--data", str(data), "--check", "exact", "--quiet"]) == 2
    assert "only apply with --generate" in capsys.readouterr().err


def test_generation_is_batched_like_one_prompt_at_a_time(facts) -> None:
    """Left-padding a batch must not change any row's greedy continuation."""
    from loraport.evaluate import load_model, load_tokenizer

    tokenizer = load_tokenizer(facts["S"])
    lm = load_model(facts["S"], facts["lora"])
    prompts = [f"Question: {q}\nAnswer:" for q in facts["questions"][:6]] + ["Question: Who?\nAnswer:"]
    together = generate(lm, tokenizer, prompts, 5, batch_size=7)
    alone = [generate(lm, tokenizer, [p], 5)[0] for p in prompts]
    assert together == alone
    torch.testing.assert_close(torch.tensor([g.tokens for g in together]), torch.tensor([g.tokens for g in alone]))
