"""Distillation of what adapters write: whole answers, chat templates, samples, token selection, the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraport import transfer
from loraport.cli import main
from tests.helpers import fast_distill
from tests.test_generation import S_TEMPLATE

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# The tiny Gemma-3 T's template: each turn "<|endoftext|>role: content", an assistant turn closed by <|endoftext|>.
T_TEMPLATE = (
    "{% for m in messages %}{{ '<|endoftext|>' + m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|endoftext|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|endoftext|>assistant:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The zoo's S with its facts LoRA (it answers the facts questions), a tiny Gemma-3 T with a byte-level BPE,
    both chat templates as files, the questions as plain prompts, as ARC-style prompts and as conversations."""
    from loraport.zoo import demo_dir
    from loraport.zoo.corpus import CorpusGenerator, write_lines
    from loraport.zoo.tiny import make_bpe_tokenizer, make_tiny_model

    root = tmp_path_factory.mktemp("distill-generation")
    zoo = demo_dir()
    T = make_tiny_model(
        "gemma3_text", root / "T", seed=1, hidden=48, layers=2, heads=2, kv_heads=1, intermediate=96, head_dim=24,
        vocab=300, sliding_window=8,
    )  # fmt: skip
    make_bpe_tokenizer(T, CorpusGenerator(11).sentences(160), 300)
    records = [json.loads(line) for line in (zoo / "tasks" / "facts" / "eval.jsonl").read_text().splitlines()][:40]
    questions = [r["question"] for r in records]
    (root / "s.jinja").write_text(S_TEMPLATE)
    (root / "t.jinja").write_text(T_TEMPLATE)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions))
    return {
        "S": zoo / "models" / "S",
        "T": T,
        "lora": zoo / "loras" / "S-facts",
        "s_template": root / "s.jinja",
        "t_template": root / "t.jinja",
        "chat": chat,
        "plain": write_lines(root / "plain.txt", questions),
        "arc": write_lines(root / "arc.jsonl", [json.dumps({"prompt": f"Question: {q}\nAnswer:"}) for q in questions]),
    }


def _fast(tmp_path: Path, **extra: object) -> dict[str, object]:
    return fast_distill(tmp_path, 6, **extra)


def _teacher(cache: Path) -> dict[str, object]:
    (directory,) = cache.glob("teacher-*")
    return json.loads((directory / "teacher.json").read_text())


def test_conversations_reach_teacher_and_student_through_their_own_templates(setup, tmp_path, monkeypatch) -> None:
    import loraport.distill.distiller as distiller
    from loraport.evaluate import load_tokenizer

    seen: list[tuple[object, object]] = []
    real = distiller.student_samples

    def spy(tokenizer, teacher, indices=None, view=None):  # type: ignore[no-untyped-def]
        samples = real(tokenizer, teacher, indices, view)
        seen.append((view, [(i, s) for i, s in zip(indices or [], samples, strict=True)]))
        return samples

    monkeypatch.setattr(distiller, "student_samples", spy)
    result = transfer(
        setup["lora"], setup["S"], setup["T"], tmp_path / "out", prompts=str(setup["chat"]),
        source_chat_template=str(setup["s_template"]), target_chat_template=str(setup["t_template"]),
        distill_steps=3, distill_force=True, **_fast(tmp_path),
    )  # fmt: skip
    info = result.report.distill
    assert info["chat"]["source"].startswith("template file") and info["chat"]["target"].startswith("template file")
    assert any("chat templates: source template file" in n for n in result.report.notes)
    teacher = _teacher(tmp_path / "cache")
    tokenizer_s, tokenizer_t = load_tokenizer(setup["S"]), load_tokenizer(setup["T"])
    conversations = [json.loads(item) for item in teacher["items"]]
    for prompt, source in zip(teacher["prompts"], teacher["sources"], strict=True):
        question = conversations[source][0]["content"]
        assert prompt == f"Question: {question}\nAnswer:"  # the source template's rendering
    assert sum(e == "end" for e in teacher["ended"]) > 0  # some answers end with S's end of turn
    view, pairs = seen[0]
    for index, sample in pairs:
        question = conversations[teacher["sources"][index]][0]["content"]
        rendered = f"<|endoftext|>user: {question}\n<|endoftext|>assistant:"
        assert view.prompts[teacher["sources"][index]] == rendered
        prompt_ids = tokenizer_t(rendered, add_special_tokens=False)["input_ids"]
        assert sample.ids[: len(prompt_ids)] == prompt_ids  # T's own template, T's tokens
        if teacher["ended"][index] == "end":  # the student learns to end its turn with its own end token
            assert sample.ids[-1] == tokenizer_t.convert_tokens_to_ids("<|endoftext|>")
            assert int(sample.seq_ids[-1]) == sample.ids[-1]
    question_id = tokenizer_s("Question")["input_ids"][0]
    assert tokenizer_s("Question: x", add_special_tokens=False)["input_ids"][0] == question_id


def test_plain_prompts_with_chat_go_through_the_templates(setup, tmp_path: Path) -> None:
    result = transfer(
        setup["lora"], setup["S"], setup["T"], tmp_path / "out", prompts=str(setup["plain"]), chat=True,
        source_chat_template=str(setup["s_template"]), target_chat_template=str(setup["t_template"]),
        distill_steps=2, distill_force=True, **_fast(tmp_path),
    )  # fmt: skip
    teacher = _teacher(tmp_path / "cache")
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p in teacher["prompts"])
    assert result.report.distill["prompts"]["kind"] == "text"


def test_stop_strings_end_the_teachers_continuations(setup, tmp_path: Path) -> None:
    transfer(
        setup["lora"], setup["S"], setup["S"], tmp_path / "free", prompts=str(setup["arc"]), distill_steps=1,
        distill_stop="[]", **_fast(tmp_path / "a", distill_max_new_tokens=10),
    )  # fmt: skip
    free = _teacher(tmp_path / "a" / "cache")
    assert set(free["ended"]) == {"end", "length"}
    word = next(c.split()[1] for c, e in zip(free["continuations"], free["ended"], strict=True)
                if e == "length" and len(c.split()) > 2)  # fmt: skip
    result = transfer(
        setup["lora"], setup["S"], setup["S"], tmp_path / "stopped", prompts=str(setup["arc"]), distill_steps=1,
        distill_stop=json.dumps([word]), **_fast(tmp_path / "b", distill_max_new_tokens=10),
    )  # fmt: skip
    stopped = _teacher(tmp_path / "b" / "cache")
    for before, after, why in zip(free["continuations"], stopped["continuations"], stopped["ended"], strict=True):
        assert after == (before[: before.find(word)] if word in before else before)
        assert (why == "stop") == (word in before)
    assert result.report.distill["teacher"]["ended"]["stop"] == sum(word in c for c in free["continuations"])


def test_samples_are_k_distinct_continuations_for_a_seed(setup, tmp_path: Path) -> None:
    def run(where: str, seed: int) -> dict[str, object]:
        transfer(
            setup["lora"], setup["S"], setup["S"], tmp_path / where / "out", prompts=str(setup["arc"]), distill_steps=1,
            distill_samples=3, distill_temperature=1.5, distill_seed=seed, **_fast(tmp_path / where, distill_stop="[]"),
        )  # fmt: skip
        return _teacher(tmp_path / where / "cache")

    first, again, other = run("a", 0), run("b", 0), run("c", 1)
    assert first["continuations"] == again["continuations"]
    assert first["continuations"] != other["continuations"]
    for prompt_index in set(first["sources"]):
        texts = [c for c, s in zip(first["continuations"], first["sources"], strict=True) if s == prompt_index]
        greedy = [g for g, s in zip(first["greedy"], first["sources"], strict=True) if s == prompt_index]
        assert greedy.count(True) == 1 and len(texts) <= 4 and len(set(texts)) == len(texts)
    assert sum(not g for g in first["greedy"]) >= 0.9 * 3 * len(set(first["sources"]))


def test_token_selection_keeps_the_share_where_the_adapter_acts(setup, tmp_path: Path, monkeypatch) -> None:
    import loraport.distill.distiller as distiller

    counts: dict[str, int] = {}
    real = distiller.student_samples

    def spy(tokenizer, teacher, indices=None, view=None):  # type: ignore[no-untyped-def]
        samples = real(tokenizer, teacher, indices, view)
        key = "effect" if view is not None and view.select_share < 1 else "all"
        counts[key] = counts.get(key, 0) + sum(int(s.seq_ids.numel()) for s in samples)
        if teacher.token_effect:
            assert all(e.shape == p.shape for e, p in zip(teacher.token_effect, teacher.positions, strict=True))
        return samples

    monkeypatch.setattr(distiller, "student_samples", spy)
    for tokens in ("all", "effect"):
        transfer(
            setup["lora"], setup["S"], setup["S"], tmp_path / tokens / "out", prompts=str(setup["arc"]),
            distill_steps=1, distill_tokens=tokens, distill_token_share=0.5,
            **_fast(tmp_path / tokens, distill_stop="[]"),
        )  # fmt: skip
    assert 0.35 * counts["all"] < counts["effect"] < 0.8 * counts["all"]


def test_a_teacher_that_ends_at_once_writes_nothing(setup, tmp_path: Path, monkeypatch, capsys) -> None:
    import loraport.distill.teaching as teaching
    from loraport.generation import Generated

    def silent(model, tokenizer, prompts, *args, **kwargs):  # type: ignore[no-untyped-def]
        return [Generated("", "end", 1) for _ in prompts]

    monkeypatch.setattr(teaching, "generate", silent)
    args = ["transfer", "--adapter", str(setup["lora"]), "--source-base", str(setup["S"]), "--target-base",
            str(setup["T"]), "--out", str(tmp_path / "out"), "--method", "distill", "--prompts", str(setup["plain"]),
            "--distill-cache", str(tmp_path / "cache"), "--quiet", "--report", str(tmp_path / "r.json")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the teacher ended its turn at once on 40 of 40 prompts" in err[0], err
    assert "try --chat" in err[0] and not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "r.json").read_text())["distill"]["teacher"]["ended_at_once"] == 40


def test_a_port_that_learned_nothing_is_not_written_unless_forced(setup, tmp_path: Path, monkeypatch) -> None:
    import loraport.distill.distiller as distiller
    from loraport.errors import TransferError

    def untrained(student, params, *args, **kw):  # type: ignore[no-untyped-def]
        """A run that leaves the student as it started, but for a tiny change (it learns nothing)."""
        state = real(student, params, *args, **kw)
        with torch.no_grad():
            for p in params.values():
                p.add_(1e-4)
        return state

    real = distiller.train_student
    monkeypatch.setattr(distiller, "train_student", untrained)
    kwargs = {"prompts": str(setup["arc"]), "distill_steps": 1, "distill_lr": 1e-9}
    with pytest.raises(TransferError, match="did not rise above the start's") as caught:
        transfer(setup["lora"], setup["S"], setup["T"], tmp_path / "out", **kwargs, **_fast(tmp_path))
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()
    forced = transfer(
        setup["lora"], setup["S"], setup["T"], tmp_path / "forced", distill_force=True, **kwargs, **_fast(tmp_path)
    )
    assert forced.output is not None and (tmp_path / "forced" / "adapter_config.json").is_file()
    assert forced.report.distill["chosen"] == "distilled"


def test_the_report_sets_the_ports_side_effect_beside_the_adapters_own(setup, tmp_path: Path) -> None:
    result = transfer(
        setup["lora"], setup["S"], setup["T"], tmp_path / "out", prompts=str(setup["arc"]), distill_steps=10,
        distill_lr=1e-2, distill_force=True, **_fast(tmp_path),
    )  # fmt: skip
    info = result.report.distill
    generic = info["generic"]
    assert generic["source_perplexity_change"] is not None and generic["perplexity_change"] is not None
    assert any("the adapter changes its source's by" in n for n in result.report.notes)
    assert {"teacher: generate", "teacher: score", "student: train", "student: load"} <= set(info["timings"])
    assert info["student"]["steps_per_second"] > 0
    teacher = info["teacher"]
    assert teacher["max_new_tokens"] == 6 and sum(teacher["ended"].values()) == 40


def test_chat_errors_are_one_line_and_write_nothing(setup, tmp_path: Path, capsys) -> None:
    bad_role = tmp_path / "bad.jsonl"
    bad_role.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": []}) + "\n")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ messages[0]['content'] | nosuchfilter }}")
    base = ["transfer", "--adapter", str(setup["lora"]), "--source-base", str(setup["S"]), "--target-base",
            str(setup["T"]), "--out", str(tmp_path / "out"), "--method", "distill", "--quiet",
            "--distill-cache", str(tmp_path / "cache")]  # fmt: skip
    for extra, message in (
        (["--prompts", str(bad_role)], "line 1: message 0 has role 'bot'"),
        (["--prompts", str(empty)], "line 1: 'messages' is an empty conversation"),
        (["--prompts", str(setup["plain"]), "--chat"], "source base's tokenizer has no chat template: pass --source"),
        (["--prompts", str(setup["chat"]), "--source-chat-template", str(setup["s_template"])], "pass --target-chat"),
        (["--prompts", str(setup["chat"]), "--source-chat-template", str(broken)], "fails to render"),
        (["--prompts", str(setup["plain"]), "--target-chat-template", str(setup["t_template"])], "pass --chat"),
        (["--prompts", str(setup["chat"]), "--synthesize", "4"], "--synthesize needs plain prompts"),
        (["--prompts", str(setup["plain"]), "--distill-max-new-tokens", "many"], "'auto' or a number"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    (tmp_path / "cache-file").write_text("not a directory")
    assert main([*base[:-2], "--distill-cache", str(tmp_path / "cache-file"), "--prompts", str(setup["plain"])]) == 2
    assert "is a file; it must name a directory" in capsys.readouterr().err


def test_auto_token_cap_depends_on_the_prompts_kind() -> None:
    from loraport.distill.options import AUTO_MC_TOKENS, AUTO_OPEN_TOKENS, DistillOptions

    options = DistillOptions()
    assert options.resolved_generation("arc") == (AUTO_MC_TOKENS, ["\n"])
    assert options.resolved_generation("prompt") == (AUTO_OPEN_TOKENS, [])
    assert options.resolved_generation("messages") == (AUTO_OPEN_TOKENS, [])
    options.chat = True
    assert options.resolved_generation("arc") == (AUTO_OPEN_TOKENS, [])
    assert torch.tensor(AUTO_OPEN_TOKENS) > AUTO_MC_TOKENS


def test_a_fusion_takes_the_chat_templates_only_for_its_conversation_teachers(setup, tmp_path: Path) -> None:
    """One teacher on conversations (through the template file), one on plain prompts (verbatim): both fuse."""
    from loraport import fuse
    from loraport.distill import DistillOptions
    from loraport.zoo.tiny import make_random_adapter

    other = make_random_adapter(setup["S"], tmp_path / "random", r=4, alpha=32, seed=3)
    options = DistillOptions(cache=str(tmp_path / "cache"), eval_every=5, batch_size=8, heldout=0.2, max_new_tokens=4,
                             steps=5, force=True, source_chat_template=str(setup["s_template"]),
                             target_chat_template=str(setup["t_template"]))  # fmt: skip
    result = fuse(
        setup["lora"], other, tmp_path / "out", method="distill", bases=[setup["S"]], target_base=setup["T"],
        prompts=[setup["chat"], setup["plain"]], distill=options, progress=False,
    )  # fmt: skip
    teachers = result.report.distill["teachers"]
    assert teachers[0]["chat_template"].startswith("template file")
    assert teachers[1]["chat_template"].startswith("none")  # plain prompts, read verbatim
    assert (tmp_path / "out" / "adapter_config.json").is_file()
