"""The shipped manual pages' headers and the units' Documentation= links, checked against the code and each other."""

from __future__ import annotations

import datetime
import re
import shlex
from pathlib import Path

from gpuschedd import __version__

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
