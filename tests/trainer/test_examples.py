"""The example task data: generated deterministically, eval disjoint from training, answers exact."""
from __future__ import annotations

import json
from pathlib import Path

from examples.make_datasets import TASKS, ZORBISH, generate, main as make
from trainer.demo import exact

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_committed_files_are_what_the_generator_writes(tmp_path):
    assert make(["--out", str(tmp_path)]) == 0
    for task in TASKS:
        for split in ("train.jsonl", "eval.jsonl"):
            assert (tmp_path / task / split).read_bytes() == (EXAMPLES / task / split).read_bytes(), \
                f"examples/{task}/{split} is stale: run `python -m examples.make_datasets`"


def test_eval_inputs_never_appear_in_training():
    for task in TASKS:
        train = {json.loads(x)["prompt"] for x in (EXAMPLES / task / "train.jsonl").read_text().splitlines()}
        ev = [json.loads(x)["prompt"] for x in (EXAMPLES / task / "eval.jsonl").read_text().splitlines()]
        assert len(ev) == len(set(ev)) == 200 and not train & set(ev)


def test_answers_follow_the_task_rules():
    train, _ = generate(TASKS["orders"], 50, 5, seed=1)
    for r in train:
        order = r["prompt"].split("\nOrder: ")[1].split("\nAnswer:")[0]
        oid, name, date, qty = r["completion"].strip().split("|")
        assert oid in order and name in order and qty in order
        y, m, d = date.split("-")
        assert len(y) == 4 and 1 <= int(m) <= 12 and 1 <= int(d) <= 28
    train, _ = generate(TASKS["zorbish"], 50, 5, seed=1)
    for r in train:
        english = r["prompt"].split("English: ")[1].split("\n")[0].split()
        assert r["completion"].strip().split() == [ZORBISH[w] for w in english]


def test_exact_match_is_strict():
    assert exact(" 123|Ann Lee|2020-01-02|4", " 123|Ann Lee|2020-01-02|4")
    assert exact("ka vel\nmore text", " ka vel")
    assert not exact("123|Ann Lee|2020-01-02|4 and more", " 123|Ann Lee|2020-01-02|4")
    assert not exact("", " ka")
