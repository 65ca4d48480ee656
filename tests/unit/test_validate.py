import pytest

from gpuschedd import validate
from gpuschedd.errors import InvalidArgs


def test_argv() -> None:
    assert validate.argv(["python3", "-c", "pass"]) == ["python3", "-c", "pass"]
    for bad in ([], [""], ["a\0b"], ["x"] * (validate.MAX_ARGV + 1), ["x" * (validate.MAX_ARG_BYTES + 1)]):
        with pytest.raises(InvalidArgs):
            validate.argv(bad)


def test_environment() -> None:
    assert validate.environment(["A=1", "_B=", "C_2=x=y"]) == ["A=1", "_B=", "C_2=x=y"]
    for bad in (["A"], ["=1"], ["1A=x"], ["A B=1"], ["A=\0"]):
        with pytest.raises(InvalidArgs):
            validate.environment(bad)


def test_paths_gpus_users() -> None:
    assert validate.working_directory("/srv/models") == "/srv/models"
    assert validate.working_directory("") == ""
    for bad in ("relative", "/a\0b"):
        with pytest.raises(InvalidArgs):
            validate.working_directory(bad)
    assert validate.gpus(["0", "GPU-5c7a2e0b-1b9c-4f43-9a41-2f2f3c6a8e11", "MIG-1234"]) == [
        "0",
        "GPU-5c7a2e0b-1b9c-4f43-9a41-2f2f3c6a8e11",
        "MIG-1234",
    ]
    for bad in (["0,1"], ["-1"], ["GPU-../x"], ["gpu0"]):
        with pytest.raises(InvalidArgs):
            validate.gpus(bad)
    assert validate.user("alice") == "alice"
    for bad in ("root:x", "../x", "Alice", "a b"):
        with pytest.raises(InvalidArgs):
            validate.user(bad)
    with pytest.raises(InvalidArgs):
        validate.description("two\nlines")
