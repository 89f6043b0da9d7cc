"""Distillation (``--method distill``): prompts, teacher targets, the student's fit, resume, no harm, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loraport import transfer
from loraport.cli import main
from loraport.distill.prompts import candidate_from, prompt_template, read_prompts, split_heldout
from loraport.distill.student import sparse_kl
from loraport.errors import LoraportError
from tests.helpers import fast_distill

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo zoo's trained S (word-level tokenizer), its derivative D, a tiny Gemma-3 T with a byte-level
    BPE, a LoRA on S that changes its predictions clearly, prompts (plain text) and generic text."""
    from loraport.zoo import demo_dir
    from loraport.zoo.corpus import CorpusGenerator, write_lines
    from loraport.zoo.tiny import make_bpe_tokenizer, make_random_adapter, make_tiny_model
    from tests.helpers import demo_source_and_copy

    root = tmp_path_factory.mktemp("distill")
    zoo = demo_dir()
    S, D = demo_source_and_copy(root)
    sentences = CorpusGenerator(11).sentences(160)
    T = make_tiny_model(
        "gemma3_text", root / "T", seed=1, hidden=48, layers=2, heads=2, kv_heads=1, intermediate=96, head_dim=24,
        vocab=300, sliding_window=8,
    )  # fmt: skip
    make_bpe_tokenizer(T, sentences, 300)
    lines = [line.strip() for line in (zoo / "calibration.txt").read_text().splitlines() if line.strip()]
    prompts = [" ".join(line.split()[: max(3, len(line.split()) // 2)]) for line in lines[:80]]
    return {
        "S": S,
        "D": D,
        "T": T,
        "lora": make_random_adapter(S, root / "lora", r=4, alpha=32, seed=3),
        "prompts": write_lines(root / "prompts.txt", prompts),
        "generic": write_lines(root / "generic.txt", lines[200:260]),
    }


def _fast(tmp_path: Path, **extra: object) -> dict[str, object]:
    return fast_distill(tmp_path, 4, **extra)


# -- prompts ----------------------------------------------------------------------------------------


def test_prompt_files_of_every_kind(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "Translate: cat ->"}\n\n{"prompt": "Translate: dog ->"}\n')
    arc = {"id": "1", "question": "Which is red?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}
    (tmp_path / "arc.jsonl").write_text(json.dumps(arc) + "\n" + json.dumps({**arc, "question": "Why?"}) + "\n")
    (tmp_path / "p.txt").write_text("first prompt\nsecond prompt\nfirst prompt\n")
    assert read_prompts(tmp_path / "p.jsonl").prompts == ["Translate: cat ->", "Translate: dog ->"]
    found = read_prompts(tmp_path / "arc.jsonl")
    assert found.kind == "arc" and found.prompts == ["Question: Which is red?\nAnswer:", "Question: Why?\nAnswer:"]
    text = read_prompts(tmp_path / "p.txt")
    assert text.prompts == ["first prompt", "second prompt"] and text.duplicates == 1
    train, held = split_heldout([f"p{i}" for i in range(20)], 0.25, seed=4)
    assert len(held) == 5 and sorted(train + held) == sorted(f"p{i}" for i in range(20))
    assert split_heldout([f"p{i}" for i in range(20)], 0.25, seed=4) == (train, held)


def test_bad_prompt_files_are_one_line_errors(tmp_path: Path) -> None:
    cases = {
        "missing.txt": None,
        "binary.txt": b"\x00\x01\x02",
        "latin1.txt": "caf\xe9 one\ncaf\xe9 two\n".encode("latin-1"),
        "broken.jsonl": b'{"prompt": "a"}\n{"prompt": \n',
        "nofield.jsonl": b'{"text": "a"}\n',
        "mixed.jsonl": b'{"prompt": "a"}\n{"question": "b"}\n',
        "one.txt": b"only one\nonly one\n",
        "empty.txt": b"\n\n",
    }
    messages = {
        "missing.txt": "not found",
        "binary.txt": "binary",
        "latin1.txt": "not UTF-8",
        "broken.jsonl": "line 2: not valid JSON",
        "nofield.jsonl": "no 'prompt', 'messages' or 'question' field",
        "mixed.jsonl": "mixes",
        "one.txt": "1 distinct prompt",
        "empty.txt": "no prompts",
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(LoraportError, match=messages[name]) as caught:
            read_prompts(tmp_path / name)
        assert "\n" not in str(caught.value)


def test_bad_prompts_on_the_command_line_write_nothing(bases, tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt here"}\n')
    base = ["transfer", "--adapter", str(bases["lora"]), "--source-base", str(bases["S"]), "--target-base",
            str(bases["D"]), "--out", str(tmp_path / "out"), "--method", "distill", "--quiet"]  # fmt: skip
    for extra, message in (
        ([], "needs --prompts FILE"),
        (["--prompts", str(tmp_path / "bad.jsonl")], "no 'prompt', 'messages' or 'question' field"),
        (["--prompts", str(tmp_path / "none.txt")], "prompts file not found"),
        (["--prompts", str(bases["prompts"]), "--distill-heldout", "1.5"], "--distill-heldout must be in (0, 1)"),
        (["--prompts", str(bases["prompts"]), "--distill-patience", "0"], "--distill-patience must be >= 1, got 0"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


def test_synthetic_prompts_keep_the_given_shape() -> None:
    seeds = ['Question: Which bin does "cat" go in?\nAnswer:', 'Question: Which bin does "plum" go in?\nAnswer:']
    prefix, suffix = prompt_template(seeds)
    assert prefix == 'Question: Which bin does "' and suffix == '" go in?\nAnswer:'
    assert candidate_from(prefix + 'fig" go in?\nAnswer: glump\n\nQuestion', prefix, suffix, 200) == (
        'Question: Which bin does "fig" go in?\nAnswer:'
    )
    assert candidate_from(prefix + 'fig" is a fruit', prefix, suffix, 200) is None  # no suffix
    assert candidate_from(prefix + '" go in?\nAnswer:', prefix, suffix, 200) is None  # nothing new


def test_synthesize_returns_n_distinct_prompts_of_the_seeds_shape(bases, monkeypatch) -> None:
    import loraport.distill.teacher as teacher_module

    words = iter(["owl", "fig", "owl", "cat", "van", "kiwi", "yak", "elm", "oak", "bee", "ant", "emu"] * 3)

    def fake_generate(model, tokenizer, texts, *args, **kwargs):  # type: ignore[no-untyped-def]
        from loraport.generation import Generated

        out = []
        for i, _ in enumerate(texts):
            text = "nonsense without the shape" if i % 3 == 2 else f'{next(words)}" go in?\nAnswer: x\n\nQ'
            out.append(Generated(text, "length", 10))
        return out

    monkeypatch.setattr(teacher_module, "generate", fake_generate)
    seeds = ['Question: Which bin does "cat" go in?\nAnswer:', 'Question: Which bin does "plum" go in?\nAnswer:']
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bases["T"]))
    found, rejected = teacher_module.synthesize_prompts(None, tokenizer, seeds, 6, torch.device("cpu"), seed=0)
    assert len(found) == 6 and len(set(found)) == 6 and not set(found) & set(seeds)
    assert all(p.startswith('Question: Which bin does "') and p.endswith('" go in?\nAnswer:') for p in found)
    assert rejected["shape"] > 0 and rejected["duplicate"] > 0  # "owl" twice, "cat" is a seed


# -- the loss ----------------------------------------------------------------------------------------


def test_sparse_kl_matches_the_dense_kl_when_the_top_k_holds_everything() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 12, generator=g, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(5, 12, generator=g, dtype=torch.float64), -1)
    dense = torch.sum(p.exp() * (p - q), -1)
    top = torch.topk(p, 12, -1)
    torch.testing.assert_close(sparse_kl(q, top.indices, top.values), dense)
    # With a tail bucket: the KL of the coarsened distributions (top 4 + the rest as one outcome).
    top4 = torch.topk(p, 4, -1)
    p_tail = 1 - top4.values.exp().sum(-1)
    q_tail = 1 - q.gather(1, top4.indices).exp().sum(-1)
    coarse = torch.sum(top4.values.exp() * (top4.values - q.gather(1, top4.indices)), -1) + p_tail * torch.log(
        p_tail / q_tail
    )
    torch.testing.assert_close(sparse_kl(q, top4.indices, top4.values), coarse)
    assert float(sparse_kl(p, top4.indices, top4.values).abs().max()) < 1e-12


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_head_on_final_hidden_states_gives_the_models_logits(zoo, model_type: str) -> None:
    """The student applies the output head itself (only where needed): it must equal the forward pass,
    Gemma-2's final soft-capping included."""
    from transformers import AutoModelForCausalLM

    from loraport.distill.student import final_hidden, head_logits, head_rows

    path = zoo.llama if model_type == "llama" else zoo.gemma2
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([[0, 0, 5, 9, 3, 7], [4, 8, 2, 6, 1, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        hidden = final_hidden(lm, ids, mask, positions)
        torch.testing.assert_close(head_logits(lm, hidden[1]), expected[1], rtol=1e-5, atol=1e-5)
        rows = torch.tensor([3, 1, 7])
        restricted = head_logits(lm, hidden[0, 2:], head_rows(lm, rows))
        torch.testing.assert_close(restricted, expected[0, 2:, rows], rtol=1e-5, atol=1e-5)
    if model_type == "gemma2":
        assert lm.config.final_logit_softcapping


# -- end to end ----------------------------------------------------------------------------------


def test_identity_start_on_the_source_itself_already_is_the_teacher(bases, tmp_path: Path) -> None:
    """S -> S with the copy as start: the teacher targets, mapped onto the student, give KL ~ 0 and full agreement."""
    result = transfer(
        bases["lora"], bases["S"], bases["S"], tmp_path / "out", prompts=str(bases["prompts"]), distill_steps=1,
        **_fast(tmp_path),
    )  # fmt: skip
    held = result.report.distill["heldout"]["start"]
    assert held["kl"] < 1e-4 and held["agreement"] == 1.0
    assert result.report.distill["support"].startswith("the whole vocabulary")
    assert result.report.distill["positions"] == "all"  # auto: every position with one tokenizer


def test_each_kl_position_setting_has_its_own_teacher_and_run(bases, tmp_path: Path) -> None:
    """A cache shared by runs that differ only in where the KL is taken never resumes the other's run."""
    for positions in ("answer", "all"):
        result = transfer(
            bases["lora"], bases["S"], bases["D"], tmp_path / positions, prompts=str(bases["prompts"]),
            distill_steps=5, distill_positions=positions, **_fast(tmp_path),
        )  # fmt: skip
        assert result.report.distill["positions"] == positions
        assert result.report.distill["student"]["steps"] == 5
    cache = tmp_path / "cache"
    assert len(list(cache.glob("teacher-*"))) == 2 and len(list(cache.glob("run-*"))) == 2


def test_the_student_learns_the_teacher_from_zero(bases, tmp_path: Path) -> None:
    """S -> S started from zero: training brings the held-out KL far down toward the teacher."""
    result = transfer(
        bases["lora"], bases["S"], bases["S"], tmp_path / "out", prompts=str(bases["prompts"]), init="zero",
        distill_steps=60, distill_positions="all", distill_loss="kl", distill_lr=3e-3, **_fast(tmp_path),
    )  # fmt: skip
    info = result.report.distill
    start, distilled = info["heldout"]["start"], info["heldout"]["distilled"]
    assert distilled["kl"] < 0.25 * start["kl"], info["student"]["history"]
    assert info["chosen"] == "distilled"
    assert result.report.method == "distill" and result.output is not None
    saved = json.loads((tmp_path / "out" / "loraport_report.json").read_text())
    assert saved["distill"]["student"]["steps"] <= 60
    assert all(m["note"].startswith("distilled") for m in saved["modules"])


def test_other_tokenizer_trains_through_aligned_positions(bases, tmp_path: Path) -> None:
    from tests.helpers import peft_load_and_forward

    result = transfer(
        bases["lora"], bases["S"], bases["T"], tmp_path / "out", prompts=str(bases["prompts"]), distill_steps=20,
        distill_lr=1e-2, calibration=str(bases["generic"]), **_fast(tmp_path),
    )  # fmt: skip
    info = result.report.distill
    assert "spell the same way" in info["support"]
    assert info["positions"] == "answer"  # auto: the answer's positions across tokenizers
    assert 0 < info["student"]["aligned_positions"] <= info["student"]["target_positions"]
    history = info["student"]["history"]
    assert min(e["probe_kl"] for e in history[1:]) < history[0]["probe_kl"]
    assert info["generic"]["text"].endswith("generic.txt") and info["generic"]["lines"] > 0
    assert peft_load_and_forward(bases["T"], tmp_path / "out") > 0


def test_auto_start_is_the_bare_target_where_shapes_differ(bases, tmp_path: Path) -> None:
    starts = {}
    for init in ("auto", "zero", "prolora"):
        result = transfer(
            bases["lora"], bases["S"], bases["T"], tmp_path / init, prompts=str(bases["prompts"]), init=init,
            distill_steps=10, distill_lr=1e-2, **_fast(tmp_path),
        )  # fmt: skip
        starts[init] = result.report.distill["student"]["history"][0]
    assert starts["auto"] == starts["zero"]
    assert starts["prolora"]["heldout_kl"] != starts["zero"]["heldout_kl"]


def test_a_distilled_port_says_nothing_of_pairing_layers_by_depth(bases, tmp_path: Path) -> None:
    """S has 4 layers and T 2: a closed-form port pairs them by relative depth and says so; distillation trains a
    new LoRA on the target and pairs no layers, so its report must not say it did, whether asked for or chosen by
    ``auto`` (T is another family)."""
    for method in ("distill", "auto"):
        distilled = transfer(
            bases["lora"], bases["S"], bases["T"], tmp_path / method, prompts=str(bases["prompts"]), distill_steps=2,
            distill_lr=1e-2, **{**_fast(tmp_path / f"{method}-cache"), "method": method},
        )  # fmt: skip
        assert distilled.report.method == "distill"
        assert not [note for note in distilled.report.notes if note.startswith("depths differ")]
    closed_form = transfer(
        bases["lora"], bases["S"], bases["T"], tmp_path / "prolora", method="prolora", progress=False
    )
    assert [note for note in closed_form.report.notes if note.startswith("depths differ (4 -> 2)")]


def test_a_killed_run_resumes_to_the_same_adapter(bases, tmp_path: Path, monkeypatch) -> None:
    import loraport.distill.distiller as distill_module
    from tests.helpers import dense_updates

    kwargs = {"prompts": str(bases["prompts"]), "init": "zero", "distill_steps": 20, "distill_lr": 5e-3}
    transfer(bases["lora"], bases["S"], bases["D"], tmp_path / "whole", **kwargs, **_fast(tmp_path / "a"))
    real_train = distill_module.train_student

    def killed(*args, **kw):  # type: ignore[no-untyped-def]
        def stop(step: int) -> None:
            if step == 13:  # after the checkpoint of step 10
                raise KeyboardInterrupt

        return real_train(*args, **kw, on_step=stop)

    monkeypatch.setattr(distill_module, "train_student", killed)
    with pytest.raises(KeyboardInterrupt):
        transfer(bases["lora"], bases["S"], bases["D"], tmp_path / "resumed", **kwargs, **_fast(tmp_path / "b"))
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(distill_module, "train_student", real_train)
    result = transfer(bases["lora"], bases["S"], bases["D"], tmp_path / "resumed", **kwargs, **_fast(tmp_path / "b"))
    assert result.report.distill["student"]["steps"] == 20
    whole, resumed = dense_updates(tmp_path / "whole"), dense_updates(tmp_path / "resumed")
    assert set(whole) == set(resumed)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_no_harm_keeps_the_start_port_when_distilling_makes_agreement_worse(bases, tmp_path, monkeypatch) -> None:
    import loraport.distill.distiller as distill_module
    from tests.helpers import dense_updates

    real_train = distill_module.train_student

    def damaging(student, params, *args, **kw):  # type: ignore[no-untyped-def]
        state = real_train(student, params, *args, **kw)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g) * 5.0)
        return state

    monkeypatch.setattr(distill_module, "train_student", damaging)
    result = transfer(
        bases["lora"], bases["S"], bases["D"], tmp_path / "out", prompts=str(bases["prompts"]), distill_steps=5,
        **_fast(tmp_path),
    )  # fmt: skip
    info = result.report.distill
    assert info["chosen"] == "start"
    assert info["heldout"]["distilled"]["agreement"] < info["heldout"]["start"]["agreement"]
    assert any(n.startswith("WARNING: distilling made held-out agreement") for n in result.report.notes)
    copy = transfer(bases["lora"], bases["S"], bases["D"], tmp_path / "copy", method="identity", progress=False)
    assert copy.output is not None
    written, start = dense_updates(tmp_path / "out"), dense_updates(tmp_path / "copy")
    for name in start:
        torch.testing.assert_close(written[name], start[name])


def test_auto_distills_an_unrelated_target_when_prompts_are_given(bases, tmp_path: Path) -> None:
    warned = transfer(bases["lora"], bases["S"], bases["T"], tmp_path / "prolora", progress=False)
    assert any(n.startswith("WARNING") and "--method distill" in n for n in warned.report.notes)
    result = transfer(
        bases["lora"], bases["S"], bases["T"], tmp_path / "auto", prompts=str(bases["prompts"]),
        **{**_fast(tmp_path), "method": "auto", "distill_steps": 5},
    )  # fmt: skip
    assert result.report.method == "distill" and result.report.distill is not None
    assert any(n.startswith("auto: the target has another tokenizer") for n in result.report.notes)
    related = transfer(bases["lora"], bases["S"], bases["D"], tmp_path / "related", progress=False,
                       prompts=str(bases["prompts"]))  # fmt: skip
    assert related.report.method == "auto" and related.report.distill is None
    assert not any(n.startswith("WARNING") for n in related.report.notes)


def test_distill_in_a_batch_manifest(bases, tmp_path: Path) -> None:
    from loraport import batch

    manifest = {
        "defaults": {"source_base": str(bases["S"]), "target_base": str(bases["D"]), "method": "distill"},
        "jobs": [
            {"adapter": str(bases["lora"]), "out": str(tmp_path / "one"), "prompts": str(bases["prompts"]),
             "distill_steps": 3, "distill_cache": str(tmp_path / "cache"), "distill_max_new_tokens": 2},
        ],
    }  # fmt: skip
    result = batch(manifest, workers=1, cache_dir=tmp_path / "subspaces", progress=False)
    assert result.ok, result.table()
    report = json.loads((tmp_path / "one" / "loraport_report.json").read_text())
    assert report["method"] == "distill" and report["distill"]["student"]["steps"] <= 3


def test_the_written_adapter_is_the_better_by_agreement_then_by_kl() -> None:
    from loraport.distill import distilled_is_better

    tol = 0.02
    assert distilled_is_better((0.50, 1.0), (0.60, 5.0), tol)  # clearly more agreement: wins whatever the KL
    assert not distilled_is_better((0.50, 1.0), (0.45, 0.1), tol)  # clearly less: loses whatever the KL
    assert distilled_is_better((0.875, 0.38), (0.875, 0.15), tol)  # a tie in agreement, lower KL: wins
    assert not distilled_is_better((0.875, 0.15), (0.875, 0.38), tol)  # a tie, higher KL: the start port
    assert not distilled_is_better((0.875, 0.15), (0.890, 0.38), tol)  # within one s.e. counts as a tie


def test_the_best_checkpoint_is_the_one_that_agrees_most_then_the_lowest_kl() -> None:
    from loraport.distill.train import is_better_checkpoint

    assert is_better_checkpoint(0.10, 9.0, None)  # the first is kept
    assert not is_better_checkpoint(0.73, 0.61, (0.82, 1.05))  # a lower KL does not buy back agreement
    assert is_better_checkpoint(0.83, 2.00, (0.82, 1.05))  # more agreement wins whatever the KL
    assert is_better_checkpoint(0.82, 1.00, (0.82, 1.05))  # the same agreement, a lower KL
    assert not is_better_checkpoint(0.82, 1.10, (0.82, 1.05))


def test_no_closed_form_port_is_computed_where_distill_does_not_start_from_it(bases, tmp_path, monkeypatch) -> None:
    """Across shapes the start is the bare target: no unit is ported (no subspace), and the report says so."""
    import loraport.llm.port as llm_port

    ported: list[int] = []
    real = llm_port.port_units

    def counting(units, *args, **kwargs):  # type: ignore[no-untyped-def]
        ported.append(len(units))
        return real(units, *args, **kwargs)

    monkeypatch.setattr(llm_port, "port_units", counting)
    result = transfer(
        bases["lora"], bases["S"], bases["T"], tmp_path / "out", prompts=str(bases["prompts"]), distill_steps=5,
        distill_lr=1e-2, **_fast(tmp_path),
    )  # fmt: skip
    assert ported == [] and result.report.cache_misses == 0
    assert {"start port", "teacher: generate", "student: train", "write"} <= set(result.report.distill["timings"])
    transfer(bases["lora"], bases["S"], bases["D"], tmp_path / "copy", prompts=str(bases["prompts"]), distill_steps=2,
             **_fast(tmp_path))  # fmt: skip
    assert ported and ported[-1] > 0  # the copy where shapes match


def test_bucketed_epochs_are_seeded_permutations_of_similar_lengths() -> None:
    from loraport.distill.train import batch_indices, epoch_order

    lengths = [(i * 37) % 101 + 5 for i in range(200)]
    order = epoch_order(3, 200, 8, seed=1, lengths=lengths)
    assert sorted(order) == list(range(200)) and order == epoch_order(3, 200, 8, seed=1, lengths=lengths)
    assert order != epoch_order(4, 200, 8, seed=1, lengths=lengths)

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    bucketed = [batch_indices(s, 200, 8, 1, lengths) for s in range(25)]
    plain = [batch_indices(s, 200, 8, 1) for s in range(25)]
    assert sorted(i for b in bucketed for i in b) == list(range(200))  # one epoch: every text once
    assert padding(bucketed) < 0.35 * padding(plain)


def test_task_shares_follow_the_gap_and_draws_keep_every_epoch_whole() -> None:
    """``--distill-task-shares gap``: more texts for the task farther from its teacher, at least half the even
    share for each, the batch's size kept; texts drawn in changing amounts still cover each epoch once."""
    from loraport.distill.train import draw_indices, epoch_order, task_sizes

    def last(*agreements: float) -> list[dict[str, float]]:
        return [{"heldout_agreement": a, "probe_agreement": a} for a in agreements]

    assert task_sizes(16, 1, "gap", last(0.1)) == [16]
    assert task_sizes(16, 4, "even", last(0.1, 0.9, 0.9, 0.9)) == [4, 4, 4, 4]
    assert task_sizes(16, 4, "gap") == [4, 4, 4, 4]  # before the first check: even
    sizes = task_sizes(16, 4, "gap", last(0.5, 0.8, 0.95, 0.95))
    assert sum(sizes) == 16 and min(sizes) >= 2 and sizes[0] > sizes[1] > sizes[2] >= 2, sizes
    assert task_sizes(16, 4, "gap", last(1.0, 1.0, 1.0, 1.0)) == [4, 4, 4, 4]  # nothing left: even
    assert task_sizes(16, 2, "gap", last(0.0, 1.0)) == [12, 4]
    assert task_sizes(3, 4, "gap", last(0.0, 1.0, 1.0, 1.0)) == [1, 1, 1, 1]  # at least one text each

    lengths = [(i * 37) % 101 + 5 for i in range(60)]
    takes, start, drawn = [3, 7, 1, 5, 4, 6, 2, 8, 9, 5, 10], 0, []
    for take in takes:
        drawn += draw_indices(start, take, 60, 4, seed=2, lengths=lengths)
        start += take
    assert drawn == epoch_order(0, 60, 4, seed=2, lengths=lengths)  # 60 texts: exactly the first epoch


def test_upper_layers_only_adapt_the_upper_half(bases, tmp_path: Path) -> None:
    result = transfer(
        bases["lora"], bases["S"], bases["D"], tmp_path / "out", prompts=str(bases["prompts"]), init="zero",
        distill_steps=20, distill_lr=1e-2, distill_layers="upper", **_fast(tmp_path),
    )  # fmt: skip
    layers = sorted({int(name.split(".layers.")[1].split(".")[0]) for name in result.adapter.modules})
    assert layers and min(layers) >= 2 and result.report.distill["student"]["modules"] == 14  # 4 layers: 2 and 3


def test_layers_auto_is_the_upper_half_from_a_bare_start_and_every_layer_after_a_port(
    bases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--distill-layers auto`` (the default): from the bare target of enough layers only the upper half
    learns; after a closed-form start port every layer is the student's, so the port's lower layers are
    kept; a shallow target (fewer than ``MIN_UPPER_LAYERS``) keeps every layer."""
    from types import SimpleNamespace

    from loraport.distill import student

    def layers(init: str) -> tuple[set[int], list[str]]:
        result = transfer(
            bases["lora"], bases["S"], bases["D"], tmp_path / init, prompts=str(bases["prompts"]), init=init,
            distill_steps=10, distill_lr=1e-2, distill_force=True, overwrite=True, **_fast(tmp_path),
        )  # fmt: skip
        found = {int(name.split(".layers.")[1].split(".")[0]) for name in result.adapter.modules}
        return found, result.report.notes

    assert layers("zero")[0] == {0, 1, 2, 3}  # D has 4 layers: too shallow for the upper half alone
    monkeypatch.setattr(student, "MIN_UPPER_LAYERS", 4)
    bare, notes = layers("zero")
    assert bare == {2, 3} and any("upper half of the target's layers" in n for n in notes)
    ported, notes = layers("prolora")
    assert ported == {0, 1, 2, 3} and not any("upper half" in n for n in notes)

    unit = SimpleNamespace
    deep = SimpleNamespace(layers_t=18, units=[unit(target=unit(module=f"m{i}", layer=i)) for i in range(18)])
    monkeypatch.setattr(student, "MIN_UPPER_LAYERS", 12)
    assert student.student_layers([deep], "auto", started=False) == [f"m{i}" for i in range(9, 18)]
    assert len(student.student_layers([deep], "auto", started=True)) == 18
    assert len(student.student_layers([deep], "all", started=False)) == 18


def test_precision_auto_is_bfloat16_only_where_the_device_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraport.distill import train

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.autocast_dtype("auto", cpu) is None  # conftest: a CPU without bfloat16 instructions
    assert train.autocast_dtype("auto", cuda) is torch.bfloat16
    assert train.autocast_dtype("float32", cuda) is None
    assert train.autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert train.autocast_dtype("mixed", cpu) is torch.bfloat16
    assert train.weights_dtype("auto", cpu) is torch.float32
    assert train.weights_dtype("auto", cuda) is torch.bfloat16
    assert train.weights_dtype("mixed", cuda) is torch.float32  # float32 weights under bfloat16 autocast
    assert train.weights_dtype("bfloat16", cpu) is torch.bfloat16
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.autocast_dtype("auto", cpu) is torch.bfloat16
    assert train.weights_dtype("auto", cpu) is torch.bfloat16


def test_a_bfloat16_head_gives_float32_logits_close_to_the_float32_head() -> None:
    from loraport.distill.heads import head_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    lm = SimpleNamespace(get_output_embeddings=lambda: head, config=SimpleNamespace())
    hidden = torch.randn(5, 16)
    exact = head_logits(lm, hidden)
    head.weight.data = head.weight.data.to(torch.bfloat16)
    narrow = head_logits(lm, hidden)
    assert narrow.dtype == torch.float32 and torch.allclose(narrow, exact, atol=0.05)
    rows = head.weight.detach()[:40]
    assert torch.allclose(head_logits(lm, hidden, rows), narrow[:, :40])


def test_a_student_with_bfloat16_weights_learns_and_keeps_float32_factors(bases, tmp_path: Path) -> None:
    """``--distill-precision bfloat16``: the base held in bfloat16, the LoRA trained (and written) in float32."""
    result = transfer(
        bases["lora"], bases["S"], bases["S"], tmp_path / "out", prompts=str(bases["prompts"]), init="zero",
        distill_steps=60, distill_positions="all", distill_loss="kl", distill_lr=3e-3, distill_precision="bfloat16",
        **_fast(tmp_path),
    )  # fmt: skip
    start, distilled = result.report.distill["heldout"]["start"], result.report.distill["heldout"]["distilled"]
    assert distilled["kl"] < 0.25 * start["kl"], result.report.distill["student"]["history"]
    assert {m.A.dtype for m in result.adapter.modules.values()} == {torch.float32}


def test_the_head_in_pieces_gives_the_same_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """The output head taken a few positions at a time under checkpointing: the same numbers, values and gradients."""
    from loraport.distill import heads

    torch.manual_seed(0)
    weight = torch.randn(50, 8, dtype=torch.float64)
    targets = torch.randint(0, 50, (11,))

    def piece(rows: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = rows @ weight.T
        return torch.nn.functional.cross_entropy(logits, wanted, reduction="none"), logits.argmax(-1) == wanted

    grads, values = [], []
    for chunk in (3, 1000):
        monkeypatch.setattr(heads, "HEAD_CHUNK", chunk)
        hidden = torch.randn(11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        nll, agreed = heads.by_pieces(piece, hidden * 2.0, targets)
        nll.mean().backward()
        grads.append(hidden.grad)
        values.append((nll.detach(), agreed))
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(values[0][0], values[1][0])
    assert torch.equal(values[0][1], values[1][1])


def test_the_patience_flag_reaches_the_distillation_settings() -> None:
    """``--distill-patience`` (how many held-out checks without progress end training) is a fuse and transfer flag."""
    from loraport.cli import build_parser
    from loraport.distill.options import DistillOptions
    from loraport.fusion.arguments import DISTILL_SKIP
    from loraport.option_fields import group_from_args

    parser = build_parser()
    fuse = parser.parse_args(["fuse", "--models", "a", "b", "--out", "o", "--method", "distill",
                              "--distill-patience", "12"])  # fmt: skip
    assert group_from_args(fuse, DistillOptions, DISTILL_SKIP, "distill.").patience == 12
    transfer = parser.parse_args(["transfer", "--adapter", "a", "--source-base", "s", "--target-base", "t",
                                  "--out", "o"])  # fmt: skip
    settings = group_from_args(transfer, DistillOptions, DISTILL_SKIP, "distill.")
    assert settings.patience == DistillOptions().patience == 4


def test_the_generic_perplexity_in_pieces_is_the_whole_logits_one(bases, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mean_nll`` applies the head a few positions at a time: the same number as the model's own logits."""
    from transformers import AutoModelForCausalLM

    from loraport.alignment import right_pad
    from loraport.distill import heads
    from loraport.distill.generic import mean_nll

    model = AutoModelForCausalLM.from_pretrained(bases["T"]).eval()
    rows = [[5, 9, 14, 3, 7, 22, 8], [4, 6], [11, 12, 13, 14, 15]]
    ids, mask = right_pad(rows, 0, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    whole = float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets))
    monkeypatch.setattr(heads, "HEAD_CHUNK", 2)  # several pieces per batch
    assert mean_nll(model, rows, torch.device("cpu"), batch_size=2) == pytest.approx(whole, rel=1e-5)


def test_parts_are_whole_steps_on_small_models_and_eight_texts_on_gemma3_shapes() -> None:
    """A step whose activations fit the budget is one part; else the fixed parts (8 texts, 2 generic lines):
    the demo's X takes its 64 prompts and 4 lines at once, a Gemma-3-270M-shaped model (18 layers, 640 + 2048
    wide) keeps 8 / 2, and so does X on long prompts."""
    from loraport.distill import train
    from loraport.distill.student import KeepSample

    def model(layers: int, hidden: int, inner: int) -> SimpleNamespace:
        config = SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inner)
        return SimpleNamespace(get_base_model=lambda: SimpleNamespace(config=config))

    def task(tokens: int) -> SimpleNamespace:
        return SimpleNamespace(train=[SimpleNamespace(ids=[0] * tokens)] * 10)

    keep = [KeepSample([0] * 48, torch.zeros(0), torch.zeros(0))] * 4
    assert train.part_sizes(model(6, 192, 384), [task(20)], keep, 64) == (64, 4)
    assert train.part_sizes(model(18, 640, 2048), [task(25)], keep, 16) == (8, 2)
    assert train.part_sizes(model(6, 192, 384), [task(200)], keep, 64) == (8, 4)
    assert train.part_sizes(model(6, 192, 384), [task(20)], keep, 4) == (8, 4)  # a step smaller than a part
    assert train.part_sizes(SimpleNamespace(), [task(20)], keep, 64) == (8, 2)  # no sizes: the fixed parts


def test_a_batch_taken_in_parts_gives_the_whole_batch_gradients(bases, tmp_path: Path, monkeypatch) -> None:
    """Parts of 1 prompt and 1 generic line against the whole batch at once: the same training, to float precision."""
    from loraport.distill import train

    adapters = []
    monkeypatch.setattr(train, "PART_BUDGET", 0)  # the fewest per part, whatever the model's size
    for parts in (16, 1):
        monkeypatch.setattr(train, "MICRO_BATCH", parts)
        monkeypatch.setattr(train, "KEEP_MICRO_BATCH", parts)
        result = transfer(
            bases["lora"], bases["S"], bases["T"], tmp_path / f"out{parts}", prompts=str(bases["prompts"]),
            init="zero", distill_steps=4, distill_lr=1e-2, distill_keep_weight=1.0, distill_force=True,
            **_fast(tmp_path / f"cache{parts}", distill_batch_size=6),
        )  # fmt: skip
        adapters.append(result.adapter.modules)
    whole, parted = adapters
    assert json.loads((tmp_path / "out1" / "loraport_report.json").read_text())["distill"]["student"]["parts"] == [1, 1]
    assert whole.keys() == parted.keys()
    for name in whole:
        assert torch.allclose(whole[name].delta(), parted[name].delta(), rtol=1e-3, atol=1e-6), name
