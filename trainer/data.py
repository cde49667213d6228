"""Training data: JSONL in one of three formats, tokenized with labels masked to what is learned.

- `{"prompt", "completion"}`: loss on the completion (and the EOS after it) only.
- `{"messages": [...]}`: rendered with the tokenizer's chat template; loss on assistant turns only.
- `{"text"}`: plain causal LM, loss on every token.

Every record is checked before any training starts: a malformed line is reported with
its line number and reason, and a mixed format, an empty file or too many bad lines
stop the run with `TrainingDataError`. Truncation to `max_seq_len` is counted and
reported, never silent.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from server.core.errors import LoraServeError

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant", "tool")


class TrainingDataError(LoraServeError):
    """The data cannot be trained on; the message says which file and lines, and why."""


@dataclass(frozen=True)
class DataConfig:
    max_seq_len: int = 512
    # Stop before training when more than this share of non-blank lines is malformed.
    max_bad_fraction: float = 0.01
    # Always tolerate this many bad lines, so one typo in a small file is a warning, not an error.
    max_bad_lines_floor: int = 0


@dataclass
class BadLine:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    line: int

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class Dataset:
    """Tokenized examples of one file plus everything worth reporting about them."""

    path: str
    format: str
    examples: list[Example]
    sha256: str
    num_lines: int
    bad_lines: list[BadLine] = field(default_factory=list)
    truncated: int = 0
    dropped_after_truncation: list[int] = field(default_factory=list)
    max_seq_len: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_label_tokens(self) -> int:
        return sum(e.num_label_tokens for e in self.examples)

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "sha256": self.sha256,
            "lines": self.num_lines, "examples": len(self.examples),
            "bad_lines": len(self.bad_lines), "truncated": self.truncated,
            "dropped_after_truncation": len(self.dropped_after_truncation),
            "tokens": self.num_tokens, "label_tokens": self.num_label_tokens,
        }

    def warnings(self) -> list[str]:
        """Human-readable notes about what was skipped or cut, for the log and report."""
        out = [f"{self.path}: skipped {b}" for b in self.bad_lines]
        if self.truncated:
            out.append(f"{self.path}: {self.truncated} examples were longer than max_seq_len="
                       f"{self.max_seq_len} tokens and were truncated to it")
        if self.dropped_after_truncation:
            lines = ", ".join(str(n) for n in self.dropped_after_truncation[:10])
            more = "" if len(self.dropped_after_truncation) <= 10 else ", ..."
            out.append(f"{self.path}: {len(self.dropped_after_truncation)} examples had no trainable "
                       f"token left after truncation and were dropped (lines {lines}{more})")
        return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_format(rec: Any) -> tuple[Optional[str], str]:
    """(format, "") for a valid record, (None, reason) otherwise."""
    if not isinstance(rec, dict):
        return None, f"expected a JSON object, got {type(rec).__name__}"
    keys = set(rec)
    if "messages" in keys:
        extra = keys - {"messages"}
        if extra & {"prompt", "completion", "text"}:
            return None, f"'messages' cannot be combined with {sorted(extra & {'prompt', 'completion', 'text'})}"
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return None, f"messages[{i}] must be an object with 'role' and 'content'"
            if m.get("role") not in _ROLES:
                return None, f"messages[{i}].role must be one of {list(_ROLES)}, got {m.get('role')!r}"
            if not isinstance(m.get("content"), str):
                return None, f"messages[{i}].content must be a string"
        if not any(m["role"] == "assistant" and m["content"] for m in msgs):
            return None, "'messages' has no non-empty assistant turn to learn from"
        return "messages", ""
    if "prompt" in keys or "completion" in keys:
        if "text" in keys:
            return None, "'text' cannot be combined with 'prompt'/'completion'"
        for k in ("prompt", "completion"):
            if k not in rec:
                return None, f"missing '{k}'"
            if not isinstance(rec[k], str):
                return None, f"'{k}' must be a string, got {type(rec[k]).__name__}"
        if not rec["completion"]:
            return None, "'completion' is empty: nothing to learn"
        return "prompt_completion", ""
    if "text" in keys:
        if not isinstance(rec["text"], str):
            return None, f"'text' must be a string, got {type(rec['text']).__name__}"
        if not rec["text"].strip():
            return None, "'text' is empty"
        return "text", ""
    return None, f"unknown record keys {sorted(keys)}; expected prompt+completion, messages or text"


def read_jsonl(path: Path, cfg: DataConfig) -> tuple[str, list[tuple[int, dict]], list[BadLine], int]:
    """Parse and validate every line; return (format, [(line number, record)], bad lines, lines)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such file")
    records: list[tuple[int, dict]] = []
    bad: list[BadLine] = []
    by_format: dict[str, list[int]] = {}
    nonblank = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                nonblank += 1
                bad.append(BadLine(n, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not line.strip():
                continue
            nonblank += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(BadLine(n, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            fmt, reason = _record_format(rec)
            if fmt is None:
                bad.append(BadLine(n, reason))
                continue
            by_format.setdefault(fmt, []).append(n)
            records.append((n, rec))
    if nonblank == 0:
        raise TrainingDataError(f"{path}: the file is empty (no JSON lines)")
    if len(by_format) > 1:
        parts = "; ".join(f"{fmt} (first at line {lines[0]}, {len(lines)} lines)"
                          for fmt, lines in sorted(by_format.items(), key=lambda kv: kv[1][0]))
        raise TrainingDataError(f"{path}: mixed record formats: {parts}; use one format per file")
    allowed = max(cfg.max_bad_lines_floor, math.floor(cfg.max_bad_fraction * nonblank))
    if not records or len(bad) > allowed:
        shown = "\n  ".join(str(b) for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise TrainingDataError(
            f"{path}: {len(bad)} of {nonblank} lines are malformed (at most {allowed} allowed):\n  "
            f"{shown}{more}")
    return next(iter(by_format)), records, bad, nonblank


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise TrainingDataError("the tokenizer has no EOS token; completions could never end")
    return int(tokenizer.eos_token_id)


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt tokens as the server tokenizes a prompt, then completion + EOS as the model must emit them."""
    p = _encode(tokenizer, prompt, special=True)
    c = _encode(tokenizer, completion, special=False) + [_eos_id(tokenizer)]
    return p + c, [IGNORE_INDEX] * len(p) + c


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids = _encode(tokenizer, text, special=True) + [_eos_id(tokenizer)]
    return ids, list(ids)


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_messages(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Render the conversation turn by turn so each assistant turn is exactly the text the
    model produces after the template's generation prompt (what the server sends it)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TrainingDataError("the tokenizer has no chat template; use prompt/completion or text records")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        else:
            before = None
        after = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if before is not None:
            if not before.startswith(rendered) or not after.startswith(before):
                raise TrainingDataError(
                    "the chat template re-renders earlier turns differently as the conversation grows, "
                    "so assistant turns cannot be isolated; use prompt/completion records instead")
            ctx = _encode(tokenizer, before[len(rendered):], special=False)
            turn = _encode(tokenizer, after[len(before):], special=False)
            eos = tokenizer.eos_token_id
            # Template glue after the turn's EOS (e.g. a newline) is never generated: do not learn it.
            cut = max((j + 1 for j, t in enumerate(turn) if t == eos), default=len(turn))
            ids += ctx + turn
            labels += [IGNORE_INDEX] * len(ctx) + turn[:cut] + [IGNORE_INDEX] * (len(turn) - cut)
        else:
            if not after.startswith(rendered):
                raise TrainingDataError(
                    "the chat template re-renders earlier turns differently as the conversation grows; "
                    "use prompt/completion records instead")
            ctx = _encode(tokenizer, after[len(rendered):], special=False)
            ids += ctx
            labels += [IGNORE_INDEX] * len(ctx)
        rendered = after
    return ids, labels


def encode_record(tokenizer, fmt: str, rec: dict) -> tuple[list[int], list[int]]:
    if fmt == "prompt_completion":
        return encode_prompt_completion(tokenizer, rec["prompt"], rec["completion"])
    if fmt == "messages":
        return encode_messages(tokenizer, rec["messages"])
    if fmt == "text":
        return encode_text(tokenizer, rec["text"])
    raise ValueError(f"unknown format {fmt!r}")


def load_dataset(path: Path, tokenizer, cfg: DataConfig, expect_format: Optional[str] = None) -> Dataset:
    """Read, validate and tokenize a JSONL file; raise TrainingDataError before any training."""
    if cfg.max_seq_len < 2:
        raise TrainingDataError(f"max_seq_len must be at least 2, got {cfg.max_seq_len}")
    fmt, records, bad, nonblank = read_jsonl(Path(path), cfg)
    if expect_format is not None and fmt != expect_format:
        raise TrainingDataError(f"{path}: records are {fmt} but the training data is {expect_format}; "
                                "use the same format for training and eval data")
    examples: list[Example] = []
    truncated = 0
    dropped: list[int] = []
    for n, rec in records:
        try:
            ids, labels = encode_record(tokenizer, fmt, rec)
        except TrainingDataError as e:
            raise TrainingDataError(f"{path}: line {n}: {e}") from e
        if len(ids) > cfg.max_seq_len:
            truncated += 1
            ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
        # Position 0 is never predicted, so a label there teaches nothing.
        if not any(t != IGNORE_INDEX for t in labels[1:]):
            dropped.append(n)
            continue
        examples.append(Example(ids, labels, n))
    if not examples:
        raise TrainingDataError(f"{path}: no example has a trainable token left "
                                f"(max_seq_len={cfg.max_seq_len} cut every completion away)")
    return Dataset(str(path), fmt, examples, file_sha256(Path(path)), nonblank, bad, truncated, dropped,
                   cfg.max_seq_len)


def collate(examples: Iterable[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and loss."""
    examples = list(examples)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
