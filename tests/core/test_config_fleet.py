"""The fleet's knobs: a postgresql:// registry with its shared objects folder, clean-up grace, drain delay."""
from __future__ import annotations

import argparse

import pytest

from server.core import config
from server.core.errors import InvalidRequestError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_flags(p)
    return p.parse_args(list(argv))


def test_a_postgresql_registry_with_its_objects_folder_from_env_and_flags() -> None:
    env = {"LORASERVE_REGISTRY": "postgresql://loraserve:secret@db:5432/loraserve", "LORASERVE_OBJECTS": "/mnt/a"}
    cfg = config.load(parse("--drain-delay", "3", "--object-grace-period", "120"), env=env)
    s = cfg.server
    assert (s.registry, s.objects, s.drain_delay, s.object_grace_period) == (env["LORASERVE_REGISTRY"], "/mnt/a",
                                                                           3.0, 120.0)
    defaults = config.load(parse(), env={}).server
    assert (defaults.registry, defaults.objects, defaults.drain_delay, defaults.object_grace_period) == \
        ("", "", 0.0, 600.0)


def test_a_postgresql_registry_needs_a_shared_objects_folder() -> None:
    with pytest.raises(InvalidRequestError, match="objects.*every replica mounts"):
        config.load(parse("--registry", "postgresql://db/loraserve"), env={})


@pytest.mark.parametrize("flag", ["--drain-delay", "--object-grace-period"])
def test_negative_seconds_are_refused(flag: str) -> None:
    with pytest.raises(InvalidRequestError, match="must be >= 0"):
        config.load(parse(flag, "-1"), env={})
