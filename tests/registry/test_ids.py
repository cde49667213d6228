import pytest

from adapter_registry.ids import AdapterSelector, check_name, parse_adapter_id
from server.core.errors import InvalidRequestError


@pytest.mark.parametrize("good", ["a", "0", "my-adapter", "x.y_z-1", "a" * 64])
def test_valid_names(good):
    assert check_name(good) == good
    assert parse_adapter_id(good) == AdapterSelector(good, None)


@pytest.mark.parametrize("bad", ["", "A", "-a", ".a", "_a", "a" * 65, "a/b", "../etc", "a b", "é", "a\x00",
                                 "name@", "name@0", "name@01", "name@-1", "name@1.5", "name@x", "@1",
                                 "name@latest@1", "name@99999999999", "name@2147483648", "name@１"])
def test_invalid_ids(bad):
    with pytest.raises(InvalidRequestError) as e:
        parse_adapter_id(bad)
    assert e.value.field == "adapter_id"


def test_versions():
    assert parse_adapter_id("n@1") == AdapterSelector("n", 1)
    assert parse_adapter_id("n@2147483647") == AdapterSelector("n", 2147483647)
    assert parse_adapter_id("n@latest") == AdapterSelector("n", None)
    assert str(AdapterSelector("n", 3)) == "n@3"
