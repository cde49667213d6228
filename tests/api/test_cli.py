"""Every `loraserve` subcommand answers --help, and the top level lists them all."""
from __future__ import annotations

import pytest

from server import cli


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and ("--target" in out or "--model" in out or "--data" in out or "register" in out)


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in cli.COMMANDS)
    assert cli.main([]) == 2


def test_serve_help_has_every_issue_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--adapter", "--host", "--port", "--metrics-port", "--quantize", "--device",
                 "--max-adapters-on-device", "--max-rank", "--config", "--tenants", "--grace-period"):
        assert flag in out, flag


def test_serve_rejects_bad_config_without_traceback(tmp_path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[server]\nport = -5\n")
    assert cli.main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "port" in err and "Traceback" not in err


def test_generate_requires_prompt_or_messages(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--target", "127.0.0.1:1"])
    assert e.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_the_servers_run_on_uvloop_unless_asked_for_asyncios_loop() -> None:
    import asyncio

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert cli.run_event_loop(loop_module(), "auto").startswith("uvloop")
    assert cli.run_event_loop(loop_module(), "uvloop").startswith("uvloop")
    assert cli.run_event_loop(loop_module(), "asyncio").startswith("asyncio")
