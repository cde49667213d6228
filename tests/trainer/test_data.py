"""Training data: every format, every malformed case, and label masks checked token by token."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import byte_tokenizer
from trainer.data import (IGNORE_INDEX, DataConfig, TrainingDataError, collate, encode_messages, load_dataset,
                          read_jsonl)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write(tmp_path: Path, rows, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    with open(p, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return p


def b(s: str) -> list[int]:
    """Ids of the byte tokenizer for ASCII text (its vocabulary is sorted by byte-level character)."""
    return list(byte_tokenizer()(s, add_special_tokens=False)["input_ids"])


def labelled(ids, labels):
    return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


# ---------------------------------------------------------------- formats and masks

def test_prompt_completion_masks_prompt_token_by_token(tok, tmp_path):
    p = write(tmp_path, [{"prompt": "Q: 2+2?", "completion": " 4"}, {"prompt": "hi", "completion": "there"}])
    ds = load_dataset(p, tok, DataConfig())
    assert ds.format == "prompt_completion" and len(ds) == 2
    e = ds.examples[0]
    prompt, completion = b("Q: 2+2?"), b(" 4")
    assert e.input_ids == prompt + completion + [tok.eos_token_id]
    assert e.labels == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]
    assert e.line == 1 and ds.examples[1].line == 2
    assert ds.num_label_tokens == (len(completion) + 1) + (len(b("there")) + 1)


def test_text_trains_on_every_token(tok, tmp_path):
    ds = load_dataset(write(tmp_path, [{"text": "hello world"}]), tok, DataConfig())
    e = ds.examples[0]
    assert ds.format == "text"
    assert e.input_ids == b("hello world") + [tok.eos_token_id]
    assert e.labels == e.input_ids


def test_messages_label_assistant_turns_only(tok, tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"}]
    ds = load_dataset(write(tmp_path, [{"messages": msgs}]), tok, DataConfig())
    e = ds.examples[0]
    # The whole sequence is exactly the rendered conversation...
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(e.input_ids) == full
    # ...and the labels are, token by token, the two assistant replies and nothing else.
    bos = tok.bos_token_id
    want_ids = ([bos] + b("system: be brief\n") + [bos] + b("user: hi\n") + [bos] + b("assistant: ")
                + b("hello\n") + [bos] + b("user: bye\n") + [bos] + b("assistant: ") + b("ciao\n"))
    assert e.input_ids == want_ids
    expect = []
    for part, learn in [([bos] + b("system: be brief\n"), False), ([bos] + b("user: hi\n"), False),
                        ([bos] + b("assistant: "), False), (b("hello\n"), True), ([bos] + b("user: bye\n"), False),
                        ([bos] + b("assistant: "), False), (b("ciao\n"), True)]:
        expect += part if learn else [IGNORE_INDEX] * len(part)
    assert e.labels == expect


def test_messages_prompt_side_equals_what_the_server_sends(tok):
    """The tokens before an assistant turn are what the server tokenizes for a chat request."""
    msgs = [{"role": "user", "content": "name a color"}, {"role": "assistant", "content": "teal"}]
    ids, labels = encode_messages(tok, msgs)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    server_side = tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
    assert ids[:first] == list(server_side)
    assert tok.decode(labelled(ids, labels)) == "teal\n"


def test_messages_stop_learning_after_the_turns_eos():
    """A template that ends turns with EOS plus glue: the glue after EOS is masked."""
    t = byte_tokenizer()
    t.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>\n{% endfor %}"
                       "{% if add_generation_prompt %}[assistant]{% endif %}")
    ids, labels = encode_messages(t, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}])
    eos = t.eos_token_id
    assert labelled(ids, labels) == b("yz") + [eos]
    assert ids[-1] == b("\n")[0] and labels[-1] == IGNORE_INDEX


def test_messages_with_unstable_template_is_refused(tmp_path):
    t = byte_tokenizer()
    # Renders the turn count up front, so earlier text changes as the conversation grows.
    t.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    p = write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(TrainingDataError, match="line 1: .*re-renders earlier turns"):
        load_dataset(p, t, DataConfig())


def test_collate_pads_right_and_masks_padding(tok, tmp_path):
    ds = load_dataset(write(tmp_path, [{"text": "abcdef"}, {"text": "ab"}]), tok, DataConfig())
    batch = collate(ds.examples, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["input_ids"][1, 3:].tolist() == [tok.pad_token_id] * 4
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 4


# ---------------------------------------------------------------- truncation

def test_truncation_is_reported_and_fully_cut_examples_dropped(tok, tmp_path):
    rows = [{"prompt": "p" * 3, "completion": "c" * 3},       # 3 + 3 + eos = 7: fits
            {"prompt": "p" * 5, "completion": "c" * 10},      # cut to 8: keeps 3 completion tokens
            {"prompt": "p" * 20, "completion": "c" * 5}]      # cut to 8: no completion left -> dropped
    ds = load_dataset(write(tmp_path, rows), tok, DataConfig(max_seq_len=8))
    assert len(ds) == 2 and ds.truncated == 2 and ds.dropped_after_truncation == [3]
    assert all(len(e.input_ids) <= 8 for e in ds.examples)
    assert labelled(ds.examples[1].input_ids, ds.examples[1].labels) == b("ccc")
    text = "\n".join(ds.warnings())
    assert "2 examples were longer than max_seq_len=8" in text and "(lines 3)" in text
    assert ds.summary()["truncated"] == 2


def test_all_examples_cut_away_is_an_error(tok, tmp_path):
    p = write(tmp_path, [{"prompt": "p" * 30, "completion": "c"}])
    with pytest.raises(TrainingDataError, match="no example has a trainable token left"):
        load_dataset(p, tok, DataConfig(max_seq_len=10))


# ---------------------------------------------------------------- malformed input

BAD_CASES = [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ('{"prompt": "x"}', "missing 'completion'"),
    ('{"completion": "x"}', "missing 'prompt'"),
    ('{"prompt": 3, "completion": "x"}', "'prompt' must be a string, got int"),
    ('{"prompt": "x", "completion": ""}', "'completion' is empty"),
    ('{"prompt": "x", "completion": "y", "text": "z"}', "'text' cannot be combined"),
    ('{"text": ""}', "'text' is empty"),
    ('{"text": null}', "'text' must be a string"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no non-empty assistant turn"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role must be one of"),
    ('{"messages": [{"role": "assistant", "content": 5}]}', "messages[0].content must be a string"),
    ('{"messages": ["hi"]}', "messages[0] must be an object"),
    ('{"messages": [{"role": "assistant", "content": "a"}], "prompt": "p"}', "cannot be combined"),
    ('{"input": "x", "output": "y"}', "unknown record keys ['input', 'output']"),
]


@pytest.mark.parametrize("line,reason", BAD_CASES, ids=[r for _, r in BAD_CASES])
def test_each_malformed_line_reported_with_number_and_reason(tok, tmp_path, line, reason):
    good = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    if line.startswith('{"text"') or line.startswith('{"messages"'):
        # Keep the file single-format so the line is judged on its own, not as a format mix.
        good = [{"text": f"t{i}"} for i in range(3)] if "text" in line else \
            [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(3)]
    p = write(tmp_path, [good[0], line, good[1], good[2]])
    # Strict: one bad line is too many, and the error names it.
    with pytest.raises(TrainingDataError) as e:
        load_dataset(p, tok, DataConfig(max_bad_fraction=0.0))
    assert any(ln.strip().startswith("line 2: ") and reason in ln for ln in str(e.value).splitlines())
    # Lenient: the line is skipped and reported, the rest trains.
    ds = load_dataset(p, tok, DataConfig(max_bad_fraction=0.5))
    assert len(ds) == 3 and [x.line for x in ds.bad_lines] == [2]
    assert reason in ds.bad_lines[0].reason
    assert any("line 2: " in w and reason in w for w in ds.warnings())


def test_invalid_utf8_line_is_reported(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(TrainingDataError, match="line 2: not valid UTF-8"):
        load_dataset(p, tok, DataConfig(max_bad_fraction=0.0))


def test_too_many_bad_lines_stop_before_training(tok, tmp_path):
    rows = [{"text": f"t{i}"} for i in range(10)] + ["oops"] * 3
    p = write(tmp_path, rows)
    with pytest.raises(TrainingDataError) as e:
        load_dataset(p, tok, DataConfig(max_bad_fraction=0.2))
    msg = str(e.value)
    assert "3 of 13 lines are malformed (at most 2 allowed)" in msg
    assert "line 11: invalid JSON" in msg and "line 13: invalid JSON" in msg
    assert len(load_dataset(p, tok, DataConfig(max_bad_fraction=0.25))) == 10


def test_empty_and_blank_files_are_errors(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TrainingDataError, match="the file is empty"):
        load_dataset(empty, tok, DataConfig())
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n   \n\n")
    with pytest.raises(TrainingDataError, match="the file is empty"):
        load_dataset(blank, tok, DataConfig())


def test_blank_lines_are_skipped_but_counted_in_numbering(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('\n{"text": "a"}\n\n{"text": "b"}\n')
    ds = load_dataset(p, tok, DataConfig())
    assert [e.line for e in ds.examples] == [2, 4]


def test_missing_file(tok, tmp_path):
    with pytest.raises(TrainingDataError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl", tok, DataConfig())


def test_mixed_formats_stop_with_where_each_starts(tok, tmp_path):
    p = write(tmp_path, [{"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"},
                         {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x"}]}])
    with pytest.raises(TrainingDataError) as e:
        read_jsonl(p, DataConfig())
    msg = str(e.value)
    assert "mixed record formats" in msg
    assert "text (first at line 1, 2 lines)" in msg
    assert "prompt_completion (first at line 3, 1 lines)" in msg
    assert "messages (first at line 4, 1 lines)" in msg


def test_eval_file_must_match_training_format(tok, tmp_path):
    p = write(tmp_path, [{"text": "a"}], "eval.jsonl")
    with pytest.raises(TrainingDataError, match="records are text but the training data is prompt_completion"):
        load_dataset(p, tok, DataConfig(), expect_format="prompt_completion")


def test_data_digest_is_the_file_sha256(tok, tmp_path):
    import hashlib

    p = write(tmp_path, [{"text": "a"}])
    assert load_dataset(p, tok, DataConfig()).sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_real_smollm2_chat_template_masks_assistant_turns(default_model_dir):
    """The default model's own template (with its injected system prompt): labels are the replies
    and their <|im_end|>, nothing else; the context is what the server sends for a chat request."""
    from server.model.loader import load_tokenizer

    t = load_tokenizer(default_model_dir)
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hi again."}]
    ids, labels = encode_messages(t, msgs)
    assert t.decode(ids) == t.apply_chat_template(msgs, tokenize=False)
    learned = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert t.decode([ids[i] for i in learned]) == "Hi there!<|im_end|>Hi again.<|im_end|>"
    first = learned[0]
    server_side = t(t.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    assert ids[:first] == list(server_side)
