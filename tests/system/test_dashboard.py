"""`gpusched dashboard` for real: the installed CLI in a tmux pane (a terminal nobody watches), driven with send-keys
and read back with capture-pane, against the daemon. The keys must do what they say, and the screen must show it."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator

import pytest
from sysutil import Models, list_models, run, wait_until

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

SOCKET = "gpusched-test"  # a tmux server of its own (tmux -L)
SESSION = "dashboard"


class Pane:
    def __init__(self, command: str, width: int = 130, height: int = 40) -> None:
        run("tmux", "-L", SOCKET, "kill-server", check=False)
        run(
            "tmux", "-L", SOCKET, "-u", "new-session", "-d", "-s", SESSION, "-x", str(width), "-y", str(height),
            f"env LANG=C.UTF-8 TERM=screen {command}",
        )  # fmt: skip
        # without a client attached, tmux 3.3 keeps its default size: set the one asked for
        run("tmux", "-L", SOCKET, "resize-window", "-t", SESSION, "-x", str(width), "-y", str(height))

    def screen(self) -> str:
        return run("tmux", "-L", SOCKET, "capture-pane", "-p", "-t", SESSION, check=False).stdout

    def keys(self, *keys: str) -> None:
        run("tmux", "-L", SOCKET, "send-keys", "-t", SESSION, *keys)

    def shows(self, what: str, pattern: str) -> str:
        """Wait until the screen matches `pattern` (a regex, multi-line); returns the screen."""
        try:
            return wait_until(
                f"the dashboard to show {what}", lambda: re.search(pattern, s := self.screen(), re.M) and s
            )
        except AssertionError as e:
            size = run(
                "tmux",
                "-L",
                SOCKET,
                "display",
                "-p",
                "-t",
                SESSION,
                "#{window_width}x#{window_height} pane #{pane_width}x#{pane_height}",
            ).stdout
            raise AssertionError(f"{e}\n--- the screen ({size.strip()}):\n{self.screen()}") from None

    def alive(self) -> bool:
        return run("tmux", "-L", SOCKET, "has-session", "-t", SESSION, check=False).returncode == 0

    def select(self, name: str) -> None:
        """Move the selection (the row marked "> ") to the model `name`."""
        for _ in range(50):
            rows = [line[4:].split()[0] for line in self.screen().splitlines() if re.match(r"^[> ] \S ", line)]
            marked = [line[4:].split()[0] for line in self.screen().splitlines() if line.startswith("> ")]
            if marked == [name]:
                return
            if name in rows and marked and marked[0] in rows:
                self.keys("Down" if rows.index(name) > rows.index(marked[0]) else "Up")
            wait_until("a redraw", lambda: True)
        raise AssertionError(f"could not select {name}:\n{self.screen()}")

    def close(self) -> None:
        run("tmux", "-L", SOCKET, "kill-server", check=False)


@pytest.fixture
def pane() -> Iterator[Pane]:
    p = Pane("gpusched dashboard")
    yield p
    p.close()


def state(name: str) -> str:
    return list_models()[name]["state"]


def row(name: str, model_state: str) -> str:
    return rf"^[> ] \S {re.escape(name)} +{model_state} "


def test_dashboard_shows_everything_and_its_keys_act(models: Models, pane: Pane) -> None:
    a, counter_a = models.run("a")
    b, _ = models.run("b")
    run("gpusched", "freeze", b)

    screen = pane.shows("both models", row(a, "running") + "(.|\n)*" + row(b, "frozen"))
    assert re.search(r"^gpuschedd [\d.]+ - .*running.*frozen.* - checkpoint \w+, units systemd", screen, re.M)
    assert re.search(r"^Host RAM \(parked\) +\[[█░]+\] .* budget$", screen, re.M), screen
    assert re.search(r"^(GPU \d .*\[[█░]+\]|GPUs: none seen)", screen, re.M), screen
    assert "NAME" in screen and "SNAPSHOT" in screen and "f freeze" in screen
    pane.shows("the event log from the journal", rf"^Events$(.|\n)*freeze +{re.escape(b)} +model {re.escape(b)} frozen")

    pane.select(a)
    pane.keys("f")
    wait_until(f"{a} frozen", lambda: state(a) == "frozen")
    pane.shows(f"{a} frozen and said so", row(a, "frozen") + rf"(.|\n)*^Froze {re.escape(a)} in \d+\.\d\d s")
    counter_a.assert_still()
    pane.keys("t")
    wait_until(f"{a} running", lambda: state(a) == "running")
    counter_a.assert_moving()

    pane.keys("s")  # swap the selected model (a) out; pick b to thaw
    pane.shows("the swap prompt", rf"^Swap {re.escape(a)} out for which model\?")
    pane.select(b)
    pane.keys("Enter")
    wait_until("the swap", lambda: (state(a), state(b)) == ("frozen", "running"))
    pane.shows("the swap's result", row(a, "frozen") + "(.|\n)*" + row(b, "running"))

    pane.keys("x")
    pane.shows("the stop question", rf"^Stop {re.escape(b)}\? y: stop it")
    pane.keys("y")
    wait_until(f"{b} stopped", lambda: state(b) == "stopped")
    pane.shows(f"{b} stopped", row(b, "stopped"))

    pane.keys("q")
    wait_until("the dashboard to quit", lambda: not pane.alive())
