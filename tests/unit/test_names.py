import pytest

from gpuschedd.errors import InvalidArgs
from gpuschedd.names import (
    bus_label_escape,
    bus_label_unescape,
    model_name_from_unit,
    model_path,
    model_unit,
    validate_model_name,
)


@pytest.mark.parametrize(
    ("label", "escaped"),
    [
        # Values systemd itself produces (busctl tree org.freedesktop.systemd1).
        ("dbus.service", "dbus_2eservice"),
        ("gpusched-model@llama.service", "gpusched_2dmodel_40llama_2eservice"),
        ("-.mount", "_2d_2emount"),
        ("1abc", "_31abc"),
        ("a1", "a1"),
        ("", "_"),
    ],
)
def test_escape_like_systemd(label: str, escaped: str) -> None:
    assert bus_label_escape(label) == escaped
    if label:
        assert bus_label_unescape(escaped) == label


def test_model_names() -> None:
    for good in ("llama", "Qwen2.5-7B", "a", "x_y", "0day", "a" * 64):
        assert validate_model_name(good) == good
        assert model_name_from_unit(model_unit(good)) == good
        assert model_path(good).startswith("/org/gpusched1/model/")
    for bad in ("", ".hidden", "-x", "a..b", "a/b", "a b", "a\0", "a" * 65, "ä", "x\n", 5, None):
        with pytest.raises(InvalidArgs):
            validate_model_name(bad)
    assert model_name_from_unit("gpusched-model@../x.service") is None
    assert model_name_from_unit("sshd.service") is None
