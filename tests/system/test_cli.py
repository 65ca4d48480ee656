"""The installed CLI as a person and a script use it: event history and logs from the journal, a systemctl-like
status, --json everywhere, progress only on a terminal, systemctl's exit codes, bash completion, man pages."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from secutil import BOB, ensure_users, run_as
from sysutil import Models, get_property, gpusched, list_models, model_path, model_unit, run, wait_until

MANAGER = ("/org/gpusched1", "org.gpusched1.Manager")


def on_terminal(command: str) -> str:
    """What a command writes to a terminal (script(1) gives it a pty), control sequences included."""
    return run("script", "--quiet", "--return", "--command", command, "/dev/null").stdout


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_events_history_and_follow(models: Models) -> None:
    name, _ = models.run("hist")
    follow = subprocess.Popen(
        ["gpusched", "events", "--follow", "--json", "--model", name, "--lines=0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.3)  # journalctl is reading: what comes now is new
        gpusched("freeze", name)
        gpusched("thaw", name)
        assert follow.stdout is not None
        seen = [json.loads(follow.stdout.readline())["event"] for _ in range(2)]
        assert seen == ["freeze", "thaw"]
    finally:
        follow.terminate()
        follow.wait(5)

    events = wait_until(
        "run, freeze and thaw in the history",
        lambda: (e := json_lines(gpusched("events", "--json", "--model", name).stdout)) and len(e) >= 3 and e,
    )
    assert [e["event"] for e in events] == ["run", "freeze", "thaw"]
    freeze = events[1]
    assert freeze["model"] == name and freeze["unit"] == model_unit(name)
    assert freeze["duration_usec"] > 0 and freeze["time"].startswith(time.strftime("%Y-"))
    text = gpusched("events", "--model", name).stdout
    assert re.search(
        rf"^\w{{3}} [ \d]\d [\d:.]+ freeze +{re.escape(name)} +model {re.escape(name)} frozen in", text, re.M
    )
    # -n, --since are journalctl's
    assert [e["event"] for e in json_lines(gpusched("events", "--json", "-m", name, "-n", "1").stdout)] == ["thaw"]
    assert gpusched("events", "--json", "-m", name, "--since", "tomorrow").stdout == ""
    assert gpusched("events", "--since", "not a time", check=False).returncode == 1


def test_logs_show_the_models_own_output(models: Models) -> None:
    name, _ = models.run("logs")
    wait_until("a line of output", lambda: "count" in gpusched("logs", name, "--no-pager").stdout, timeout=5)
    lines = gpusched("logs", name, "-n", "2").stdout.splitlines()
    assert len(lines) == 2 and all("count" in line or name in line for line in lines)
    entries = json_lines(gpusched("logs", name, "--json").stdout)
    assert {e.get("_SYSTEMD_UNIT") for e in entries if "count" in e["MESSAGE"]} == {model_unit(name)}
    assert gpusched("logs", "../etc", check=False).returncode == 1


def test_status_like_systemctl_and_exit_codes(models: Models) -> None:
    name, _ = models.run("st")
    gone, _ = models.run("gone")
    gpusched("stop", gone)
    gpusched("freeze", name)
    text = gpusched("status").stdout
    assert re.search(r"^● gpuschedd [\d.]+ - .*1 frozen", text, re.M), text
    for label in ("Backends", "GPUs", "Host RAM"):
        assert re.search(rf"^ +{label}: ", text, re.M), label
    block = text.split(f" {name} - ", 1)[1].split("\n\n")[0]
    assert block.startswith("frozen")
    for label, value in (("Unit", model_unit(name)), ("Owner", "root (0)"), ("Snapshot", "in host RAM")):
        assert re.search(rf"^ +{label}: .*{re.escape(value)}", block, re.M), (label, block)
    assert re.search(r"^ +Since: .*; \d+s ago$", block, re.M)
    assert re.search(r"^ +Last freeze: \d+\.\d{3} s, last thaw 0\.000 s$", block, re.M)
    # only the named model; 3 when it is not live, 4 when there is none (systemctl status' codes)
    assert gpusched("status", name).stdout.startswith(f"❄ {name} - frozen")
    assert gpusched("status", gone, check=False).returncode == 3
    assert gpusched("status", "no-such-model", check=False).returncode == 4
    assert gpusched("freeze", "no-such-model", check=False).returncode == 4
    assert gpusched("thaw", gone, check=False).returncode == 1
    assert gpusched("swap", check=False).returncode == 2


def test_thp_mode_is_a_manager_property() -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    expected = re.search(r"\[(\w+)\]", thp.read_text()).group(1) if thp.exists() else ""  # type: ignore[union-attr]
    assert get_property(*MANAGER, "TransparentHugepages") == expected
    status = json.loads(gpusched("status", "--json").stdout)
    assert status["manager"]["TransparentHugepages"] == expected


def test_json_everywhere(models: Models) -> None:
    name = models.name("js")
    models.names.append(name)
    counter = models.counter(name)
    started = json.loads(gpusched("--json", "run", "--name", name, "--", *counter.argv()).stdout)
    assert started["unit"] == model_unit(name) and started["path"] == model_path(name)
    assert json.loads(gpusched("freeze", name, "--json").stdout)["State"] == "frozen"
    assert json.loads(gpusched("thaw", name, "--json").stdout)["State"] == "running"
    rows = {m["name"]: m for m in json.loads(gpusched("list", "--json").stdout)}
    assert rows[name]["state"] == "running" and rows[name]["unit"] == model_unit(name)
    status = json.loads(gpusched("status", "--json", name).stdout)
    assert [m["Name"] for m in status["models"]] == [name]
    assert json.loads(gpusched("stop", name, "--json").stdout)["ok"] is True


def test_progress_and_summary_only_on_a_terminal(models: Models) -> None:
    name, _ = models.run("tty")
    piped = gpusched("freeze", name)
    assert piped.stdout == "" and piped.stderr == ""  # nothing when piped, as systemctl
    gpusched("thaw", name)
    shown = on_terminal(f"gpusched freeze {name}")
    assert re.search(rf"Froze {name} in \d+\.\d\d s: .* parked in host RAM", shown), shown
    assert f"{name} was already frozen" in on_terminal(f"gpusched freeze {name}")
    assert re.search(rf"Thawed {name} in \d+\.\d\d s", on_terminal(f"gpusched thaw {name}"))
    assert list_models()[name]["state"] == "running"


def test_bash_completion_offers_commands_and_models(models: Models) -> None:
    running, _ = models.run("comp-run")
    frozen, _ = models.run("comp-frz")
    gpusched("freeze", frozen)

    def complete(*words: str) -> list[str]:
        script = (
            "source /usr/share/bash-completion/completions/gpusched; "
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
            '_gpusched; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        return run("bash", "-c", script).stdout.split()

    assert {"freeze", "thaw", "swap", "events", "logs"} <= set(complete("gpusched", ""))
    assert complete("gpusched", "fr") == ["freeze"]
    assert running in complete("gpusched", "freeze", "") and frozen not in complete("gpusched", "freeze", "")
    assert frozen in complete("gpusched", "thaw", "") and running not in complete("gpusched", "thaw", "")
    assert complete("gpusched", "swap", running, "") == [frozen] or frozen in complete("gpusched", "swap", running, "")
    assert "--follow" in complete("gpusched", "events", "--f")
    assert "--no-legend" in complete("gpusched", "list", "--")


def test_bash_completion_under_nounset_and_stop_offers_only_live_models(models: Models) -> None:
    """In a shell with `set -u` the completion reads no unset variable (it printed "$1: unbound variable" for
    stop, status, logs and events -m), and `stop` is offered the models that can be stopped, not stopped ones."""
    running, _ = models.run("nu-run")
    frozen, _ = models.run("nu-frz")
    stopped, _ = models.run("nu-stp")
    gpusched("freeze", frozen)
    gpusched("stop", stopped)
    assert list_models()[stopped]["state"] == "stopped"

    def complete(*words: str) -> list[str]:
        script = (
            "set -u; source /usr/share/bash-completion/completions/gpusched; "
            f"COMP_WORDS=({shlex.join(words)}); COMP_CWORD={len(words) - 1}; "
            '_gpusched; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        proc = run("bash", "-c", script)
        assert proc.stderr == "", proc.stderr  # no "unbound variable"
        return proc.stdout.split()

    offered = complete("gpusched", "stop", "")
    assert running in offered and frozen in offered and stopped not in offered
    for words in (("status", ""), ("logs", ""), ("events", "-m", ""), ("events", "--model", ""), ("forget", "")):
        assert {running, frozen, stopped} <= set(complete("gpusched", *words)), words
    assert running in complete("gpusched", "freeze", "") and stopped not in complete("gpusched", "freeze", "")
    assert complete("gpusched", "fr") == ["freeze"]


def test_man_pages_installed() -> None:
    for page in (
        "/usr/share/man/man1/gpusched.1",
        "/usr/share/man/man5/gpusched-models.d.5",
        "/usr/share/man/man8/gpuschedd.8",
    ):
        assert Path(page).is_file(), page
    if shutil.which("man") is None:
        pytest.skip("no man(1) here")
    text = run("man", "-P", "cat", "gpusched", check=False).stdout
    assert "EXIT STATUS" in text and "gpuschedd(8)" in text


def test_json_styles_help_no_pager_and_systemd_colors(models: Models) -> None:
    name, _ = models.run("styles")
    short = gpusched("--json", "list", "--no-pager").stdout
    assert short.count("\n") == 1 and json.loads(short) == json.loads(gpusched("list", "--json=short").stdout)
    pretty = gpusched("list", "--json=pretty").stdout
    assert "\n  " in pretty and name in {m["name"] for m in json.loads(pretty)}
    assert gpusched("help", "freeze").stdout.startswith("usage: gpusched freeze")
    assert "\x1b[" in run("env", "SYSTEMD_COLORS=1", "gpusched", "status").stdout  # colour though piped
    assert "\x1b[" not in on_terminal(f"env SYSTEMD_COLORS=0 gpusched status {name}")
    assert "\x1b[" in on_terminal(f"env -u NO_COLOR TERM=xterm gpusched status {name}")
    completion = "source /usr/share/bash-completion/completions/gpusched; _gpusched; printf '%s\\n' \"${COMPREPLY[@]}\""
    offered = run("bash", "-c", f"set -u; COMP_WORDS=(gpusched help fr); COMP_CWORD=2; {completion}").stdout.split()
    assert offered == ["freeze"]
    offered = run("bash", "-c", f"set -u; COMP_WORDS=(gpusched list --); COMP_CWORD=2; {completion}").stdout.split()
    assert {"--json=pretty", "--no-pager"} <= set(offered)


def test_a_user_outside_the_group_is_told_how_to_join(models: Models) -> None:
    ensure_users()
    name = models.name("outsider")
    models.names.append(name)
    refused = run_as(BOB, "gpusched", "--no-ask-password", "run", "--name", name, "--", "sleep", "60", check=False)
    assert refused.returncode == 1, refused
    assert f"usermod -aG gpusched {BOB}, then log in again" in refused.stderr, refused.stderr
    assert name not in list_models()
