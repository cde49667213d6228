"""`loraserve generate --messages FILE` names what is wrong with the file before it connects anywhere."""
from __future__ import annotations

import pytest

from server import cli


@pytest.mark.parametrize("content, words", [(None, "cannot read it (No such file or directory)"),
                                            ("not json", "not JSON or JSONL"),
                                            ('{"content": "no role"}', "expected a JSON list")])
def test_a_bad_messages_file_is_named(tmp_path, content, words) -> None:
    path = tmp_path / "chat.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--target", "127.0.0.1:1", "--messages", str(path)])
    assert str(e.value).startswith(f"error: {path}: {words}")
