"""``loraport.evaluate`` against lm-evaluation-harness itself (skipped without the ``eval`` extra).

Runs the comparison of ``benchmarks/eval_parity.py``: a tiny random Llama with a byte-level
BPE tokenizer (with and without a BOS), base and base + random LoRA, ARC questions from a
local JSONL scored by lm-eval's ``hf`` model on an ``arc_challenge``-identical YAML task.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]'): parity check skipped")


@pytest.fixture(scope="module")
def parity():
    from tests.helpers import benchmark_script

    yield from benchmark_script("eval_parity")


@pytest.mark.parametrize(("add_bos", "batch_sizes"), [(True, (1, 8)), (False, (4,))])
def test_matches_lm_eval(parity, tmp_path: Path, add_bos: bool, batch_sizes: tuple[int, ...]) -> None:
    rows = parity.parity_rows(tmp_path, questions=40, batch_sizes=batch_sizes, add_bos=add_bos)
    print(parity.format_rows(rows))
    for row in rows:
        where = f"{row['model']}, BOS {add_bos}, batch {row['batch_size']}"
        assert row["loraport"]["acc"] == row["lm_eval"]["acc"], where
        assert row["loraport"]["acc_norm"] == row["lm_eval"]["acc_norm"], where
        assert row["max_ll_diff"] <= parity.LL_TOLERANCE, where
    # The fixture must make the two metrics disagree somewhere, or acc_norm is not really tested.
    assert any(row["lm_eval"]["acc"] != row["lm_eval"]["acc_norm"] for row in rows)
