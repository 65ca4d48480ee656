"""The shipped manual pages' headers and the units' Documentation= links, checked against the code and each other."""

from __future__ import annotations

import datetime
import re
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gpuschedd import __version__
from gpuschedd.config import SETTINGS, Config
from gpuschedd.names import MANAGER_IFACE
from gpuschedd.options import RunOptions, declared

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted(p for p in (REPO / "man").iterdir() if re.fullmatch(r"[\w.-]+\.[1-8]", p.name))


def test_th_has_date_and_version() -> None:
    """.TH TITLE SECTION DATE SOURCE MANUAL (man(7)): the date of the page's last change, the version it documents."""
    assert PAGES
    for page in PAGES:
        th = next(line for line in page.read_text().splitlines() if line.startswith(".TH "))
        title, section, date, source, manual = shlex.split(th)[1:]
        name, _, number = page.name.rpartition(".")
        assert (title, section) == (name.upper(), number), page.name
        assert datetime.date.fromisoformat(date) <= datetime.date.today(), page.name
        assert source == f"gpuschedd {__version__}", page.name
        assert manual, page.name


def test_units_document_shipped_pages() -> None:
    """Every man: link in a shipped unit names a page the project installs; the daemon's unit links both."""
    shipped = {page.name for page in PAGES}
    linked: dict[str, set[str]] = {}
    for unit in (REPO / "units").iterdir():
        for line in unit.read_text().splitlines():
            if line.startswith("Documentation="):
                for ref in line.removeprefix("Documentation=").split():
                    if m := re.fullmatch(r"man:([\w.-]+)\(([1-8])\)", ref):
                        linked.setdefault(unit.name, set()).add(f"{m[1]}.{m[2]}")
    assert {"gpuschedd.8", "gpusched.1"} <= linked["gpuschedd.service"]
    for unit, pages in linked.items():
        assert pages <= shipped, unit


def section(page: str, heading: str) -> str:
    """The man(7) source of one .SH section of a page."""
    text = (REPO / "man" / page).read_text()
    return text.split(f".SH {heading}\n", 1)[1].split("\n.SH ", 1)[0]


def settings() -> set[str]:
    return {*SETTINGS, "RamBudget"}


def test_conf_page_describes_every_setting_with_its_default() -> None:
    """gpuschedd.conf(5) has one entry per setting of config.py, no other, and its "(default X)" is the default
    Config holds: X read by the setting's own parser ("empty": a setting that is off or empty by default)."""
    entries = dict(re.findall(r'^\.TP\n\.BR (\w+)= " \(default (.*)\)"$', section("gpuschedd.conf.5", "OPTIONS"), re.M))
    assert set(entries) == settings()
    assert entries.pop("RamBudget") == "50%"
    defaults = Config(ram_budget_bytes=0)
    for key, text in entries.items():
        attr, parse = SETTINGS[key]
        expected = getattr(defaults, attr)
        if text == "empty":
            assert not expected, f"{key}: man says empty, the default is {expected!r}"
        else:
            assert parse(text.replace("\\-", "-")) == expected, f"{key}: man says {text}, the default is {expected!r}"


def test_daemon_page_names_every_setting() -> None:
    named = set(re.findall(r"^\.BR? (\w+)=", section("gpuschedd.8", "CONFIGURATION"), re.M))
    assert named == settings()
    assert "gpuschedd.conf (5)" in section("gpuschedd.8", "CONFIGURATION")


def test_daemon_page_documents_every_dbus_member() -> None:
    """Each method of the shipped interface XML has an entry in gpuschedd(8), every property and signal is named."""
    text = section("gpuschedd.8", "D-BUS INTERFACE")
    entries = set(re.findall(r"^\.B[IR]? (\w+)\(", text, re.M)) | set(re.findall(r"\\fR?\s*(\w+)\(", text))
    entries |= set(re.findall(r'^\.B[IR]? .*?" (\w+)\(', text, re.M))
    named = set(re.findall(r"^\.BR? (\w+)(?: ,)?$", text, re.M)) | set(re.findall(r"^\.BR (\w+) ", text, re.M))
    xml = ET.parse(REPO / "dbus" / "org.gpusched1.xml").getroot()
    for iface in xml.findall("interface"):
        for method in iface.findall("method"):
            assert method.get("name") in entries | (named if iface.get("name") != MANAGER_IFACE else set()), (
                f"{iface.get('name')}.{method.get('name')} is not in gpuschedd.8"
            )
        for member in [*iface.findall("property"), *iface.findall("signal")]:
            assert member.get("name") in named, f"{iface.get('name')}.{member.get('name')} is not in gpuschedd.8"


def test_run_entry_names_every_run_option() -> None:
    run = section("gpuschedd.8", "D-BUS INTERFACE").split(".BI Run(", 1)[1].split("\n.TP\n", 1)[0]
    named = set(re.findall(r"^\.BR? (\w+)", run, re.M))
    assert {spec.key for _f, spec in declared(RunOptions)} <= named


@pytest.mark.skipif(shutil.which("groff") is None, reason="no groff")
@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_pages_render_without_warnings(page: str) -> None:
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(REPO / "man" / page)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_every_page_is_installed_and_packaged() -> None:
    """make install and uninstall name every page; the rpm's %files and the package tests' list have it."""
    makefile = (REPO / "Makefile").read_text()
    spec = (REPO / "packaging" / "rpm" / "gpuschedd.spec").read_text()
    shared = (REPO / "tests" / "packaging" / "pkgtest.py").read_text()
    for page in PAGES:
        number = page.name.rpartition(".")[2]
        assert f"man/{page.name}" in makefile, page.name
        assert makefile.count(f"man{number}/{page.name}") >= 2, f"{page.name}: install and uninstall"
        assert f"%{{_mandir}}/man{number}/{page.name}*" in spec, page.name
        assert f"/usr/share/man/man{number}/{page.name}.gz" in shared, page.name
