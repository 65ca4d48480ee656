"""Real programs run as models the way they run from their user's shell, where they should (docs/models.md): the
login variables of the user they run as, root's included; the caller's variables copied with `-E NAME`, as
systemd-run does; and Open MPI's singleton init, which an unmodified PyTorch Lightning script goes through when
mpi4py is installed."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest
from secutil import ALICE, ensure_users, run_as
from sysutil import GUEST_PYTHON, Models, gpusched, list_models, model_unit, run, unit_property, wait_until

MPI_INIT = 'from mpi4py import MPI; print("mpi size", MPI.COMM_WORLD.Get_size(), "rank", MPI.COMM_WORLD.Get_rank())'


@pytest.fixture(scope="module", autouse=True)
def users() -> None:
    ensure_users()


def run_to_the_end(models: Models, suffix: str, user: str, *argv: str, env: dict[str, str] | None = None) -> str:
    """`gpusched run` as `user` (from a shell with `env` added), until the model ends; its output. It must succeed."""
    name = models.name(suffix)
    models.names.append(name)
    command = ["gpusched", "--no-ask-password", "run", "--name", name, *argv]
    if env:
        command = ["env", *(f"{key}={value}" for key, value in env.items()), *command]
    run_as(user, *command)
    state = wait_until(
        f"model {name} to end",
        lambda: (s := list_models().get(name, {}).get("state")) in ("stopped", "failed") and s,
    )
    output = wait_until(
        f"the output of {name}",
        lambda: run("journalctl", "-u", model_unit(name), "-o", "cat", "--no-pager", check=False).stdout,
    )
    assert state == "stopped", f"{name} {state}:\n{output}"
    return output


@pytest.mark.parametrize("user", ["root", ALICE])
def test_login_variables_of_the_user(models: Models, user: str) -> None:
    """HOME, USER, LOGNAME and SHELL are the user's own, root's as well (systemd sets them only for a unit with
    User=; root's models had none, so a program looking for ~/.cache or ~/.config looked in /)."""
    output = run_to_the_end(models, f"env-{user}", user, "--", "env")
    entry = pwd.getpwnam(user)
    found = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    expected = {"HOME": entry.pw_dir, "USER": user, "LOGNAME": user, "SHELL": entry.pw_shell}
    assert {key: found.get(key) for key in expected} == expected, output


def test_setenv_name_copies_the_callers_value(models: Models) -> None:
    """-E NAME takes the caller's value, -E NAME=VALUE the one given; a name the caller lacks becomes empty; and
    nothing else of the caller's environment reaches the model."""
    script = 'printf "%s|%s|%s|%s\\n" "$GS_COPIED" "$GS_GIVEN" "${GS_MISSING-unset}" "${GS_NOT_ASKED-absent}"'
    output = run_to_the_end(
        models,
        "setenv",
        "root",
        "-E",
        "GS_COPIED",
        "-E",
        "GS_GIVEN=given",
        "-E",
        "GS_MISSING",
        "--",
        "sh",
        "-c",
        script,
        env={"GS_COPIED": "from the shell", "GS_NOT_ASKED": "x"},
    )
    assert "from the shell|given||absent" in output.splitlines(), output


def test_argv_reaches_the_program_as_given(models: Models) -> None:
    """No ${NAME} or $NAME of the argv is replaced by systemd (its ExecStart= would): the program gets what exec
    from a shell gives it. A shell snippet, a template or a regex with a dollar arrives intact."""
    words = ["${HOME}", "$HOME", "$$", "a${USER}b", "$"]
    output = run_to_the_end(models, "argv", "root", "--", "printf", "<%s>\\n", *words)
    assert [f"<{w}>" for w in words] == [line for line in output.splitlines() if line.startswith("<")], output


def test_a_model_keeps_its_command_through_daemon_reload(models: Models) -> None:
    """systemd rereads a transient unit from the file it wrote at each daemon-reload (a package's maintainer scripts
    run one): the model runs on, the same process with its command (a unit written with ExecStartEx= lost it on
    systemd 252, and the unit stopped), and the command is still the one given."""
    script = "while :; do sleep 0.2; done # ${HOME} $$"
    name, _ = models.run("reload", argv=["sh", "-c", script])
    unit = model_unit(name)
    pid = wait_until(f"{unit} to run", lambda: int(unit_property(unit, "MainPID")))
    before = unit_property(unit, "InvocationID")
    run("systemctl", "daemon-reload")
    assert "argv[]=sh -c " in unit_property(unit, "ExecStart")
    assert (unit_property(unit, "ActiveState"), unit_property(unit, "InvocationID")) == ("active", before)
    assert int(unit_property(unit, "MainPID")) == pid
    assert Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:3] == ["sh", "-c", script]
    shown = json.loads(gpusched("status", "--json", name, check=False).stdout)
    assert [m["Command"] for m in shown["models"]] == [["sh", "-c", script]]


def mpi4py_present() -> bool:
    probe = subprocess.run([GUEST_PYTHON, "-c", "import mpi4py"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(
    not mpi4py_present(), reason="no mpi4py for /usr/bin/python3 (tools/prerequisites.sh check installs python3-mpi4py)"
)
@pytest.mark.parametrize("user", ["root", ALICE])
def test_open_mpi_singleton_init(models: Models, user: str) -> None:
    """MPI_Init without mpirun (Open MPI's singleton: it starts its own orted) works in a model as in a shell."""
    shell = run_as(user, "env", "-i", f"HOME={pwd.getpwnam(user).pw_dir}", f"PATH={os.defpath}", GUEST_PYTHON,
                   "-c", MPI_INIT, check=False)  # fmt: skip
    assert shell.returncode == 0 and "mpi size 1 rank 0" in shell.stdout, shell.stdout + shell.stderr
    output = run_to_the_end(models, f"mpi-{user}", user, "--", GUEST_PYTHON, "-c", MPI_INIT)
    assert "mpi size 1 rank 0" in output.splitlines(), output
