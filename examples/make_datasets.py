"""Generate the two example tasks (train/eval JSONL) that `make demo` trains adapters on.

Both are made up here, so the base model cannot have seen them, and both are scored by
exact match of the whole answer:

- `orders`: pull four fields out of a free-form order sentence into a fixed
  `id|name|date|qty` line, with dates normalized to ISO (some sentences spell the month).
- `zorbish`: translate a short English phrase word by word into an invented language
  with a fixed 20-word dictionary.

Eval sets hold combinations never seen in training (new ids, names, dates; new phrases).
Run: `python -m examples.make_datasets [--out examples] [--seed 0]`; the outputs are
deterministic for a seed and are committed beside this script.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Sofia", "Ivan", "Grace", "Ahmed",
         "Nora", "Felix", "Mei", "Lucas", "Hana", "Diego", "Elena", "Sam", "Zara", "Peter", "Yuki", "Rosa"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Novak", "Silva", "Patel", "Brown", "Rossi", "Petrov", "Kim",
        "Costa", "Meyer", "Khan", "Dubois", "Berg", "Wong", "Garcia", "Olsen", "Ward", "Fischer", "Reyes"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ITEMS = ["blue widgets", "desk lamps", "coffee mugs", "notebooks", "usb cables", "garden chairs", "phone cases",
         "water bottles", "wool scarves", "bike lights"]

ORDER_TEMPLATES: list[Callable[[dict], str]] = [
    lambda o: f"Order {o['id']} was placed by {o['name']} on {o['iso']} for {o['qty']} {o['item']}.",
    lambda o: f"On {o['iso']}, {o['name']} bought {o['qty']} {o['item']} (order #{o['id']}).",
    lambda o: f"{o['name']} ordered {o['qty']} {o['item']} on {o['long']}; reference number {o['id']}.",
    lambda o: f"Ref {o['id']} | customer: {o['name']} | qty {o['qty']} | date {o['iso']} | {o['item']}",
    lambda o: f"We shipped {o['qty']} {o['item']} to {o['name']}. Order {o['id']}, dated {o['long']}.",
]
ORDER_PROMPT = "Extract id|name|date|qty from the order.\nOrder: {text}\nAnswer:"

ZORBISH = {
    "red": "vel", "blue": "sorn", "green": "quib", "big": "tam", "small": "pil", "cat": "mokra", "dog": "fenu",
    "bird": "triska", "fish": "pell", "tree": "olom", "house": "drav", "sun": "kiru", "moon": "lesh",
    "eats": "tisu", "sees": "vorn", "likes": "amu", "the": "ka", "a": "o", "and": "ze", "runs": "gash",
}
ADJ = ["red", "blue", "green", "big", "small"]
NOUN = ["cat", "dog", "bird", "fish", "tree", "house", "sun", "moon"]
VERB = ["eats", "sees", "likes", "runs"]
ZORBISH_PROMPT = "Translate to Zorbish.\nEnglish: {text}\nZorbish:"


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], tuple[str, str]]  # -> (input text, answer)
    prompt: str


def _order(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(2019, 2026), rng.randint(1, 12), rng.randint(1, 28)
    o = {"id": rng.randint(1000, 99999), "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
         "qty": rng.randint(1, 60), "item": rng.choice(ITEMS), "iso": f"{year:04d}-{month:02d}-{day:02d}",
         "long": f"{MONTHS[month - 1]} {day}, {year}"}
    text = rng.choice(ORDER_TEMPLATES)(o)
    return text, f"{o['id']}|{o['name']}|{o['iso']}|{o['qty']}"


def _phrase(rng: random.Random) -> list[str]:
    shape = rng.randrange(4)
    if shape == 0:
        return [rng.choice(["the", "a"]), rng.choice(ADJ), rng.choice(NOUN), rng.choice(VERB)]
    if shape == 1:
        return ["the", rng.choice(NOUN), rng.choice(VERB[:3]), rng.choice(["the", "a"]), rng.choice(NOUN)]
    if shape == 2:
        return [rng.choice(ADJ), rng.choice(NOUN), "and", rng.choice(ADJ), rng.choice(NOUN)]
    return [rng.choice(NOUN), rng.choice(VERB)]


def _zorbish(rng: random.Random) -> tuple[str, str]:
    words = _phrase(rng)
    return " ".join(words), " ".join(ZORBISH[w] for w in words)


TASKS = {
    "orders": Task("orders", _order, ORDER_PROMPT),
    "zorbish": Task("zorbish", _zorbish, ZORBISH_PROMPT),
}


def record(task: Task, text: str, answer: str) -> dict[str, str]:
    # The completion starts with a space: the prompt ends at "Answer:" / "Zorbish:" as a human would write it.
    return {"prompt": task.prompt.format(text=text), "completion": " " + answer}


def generate(task: Task, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval records with no eval input appearing in training."""
    rng = random.Random(f"{task.name}-{seed}")
    seen: set[str] = set()
    evals: list[dict] = []
    while len(evals) < n_eval:
        text, answer = task.make(rng)
        if text not in seen:
            seen.add(text)
            evals.append(record(task, text, answer))
    train: list[dict] = []
    guard = 0
    while len(train) < n_train:
        text, answer = task.make(rng)
        guard += 1
        if guard > 100 * n_train:
            raise RuntimeError(f"{task.name}: cannot draw {n_train} distinct training inputs")
        if text in seen:
            continue
        seen.add(text)
        train.append(record(task, text, answer))
    return train, evals


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--eval", type=int, default=200)
    a = p.parse_args(argv)
    for name, task in TASKS.items():
        train, ev = generate(task, a.train, a.eval, a.seed)
        write_jsonl(a.out / name / "train.jsonl", train)
        write_jsonl(a.out / name / "eval.jsonl", ev)
        print(f"{name}: {len(train)} train, {len(ev)} eval -> {a.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
