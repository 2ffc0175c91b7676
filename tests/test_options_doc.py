"""docs/options.md is generated from the code (memascend/options_doc.py) and must be current;
every environment variable the package reads is on it."""
from __future__ import annotations

import re
from pathlib import Path

from memascend import options_doc

ROOT = Path(__file__).resolve().parent.parent


def test_options_page_is_current():
    page = (ROOT / "docs" / "options.md").read_text()
    assert page == options_doc.render(), \
        "docs/options.md is stale: run python -m memascend.options_doc > docs/options.md"


def test_every_environment_variable_read_is_documented():
    read = set()
    for path in (ROOT / "memascend").rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r"environ(?:\.get)?\(\s*\"([A-Z_][A-Z0-9_]*)\"", text))
        read |= set(re.findall(r"environ\[\"([A-Z_][A-Z0-9_]*)\"\]", text))
        read |= set(re.findall(r"^OPTIONS_ENV = \"([A-Z_]+)\"", text, re.M))
    page = (ROOT / "docs" / "options.md").read_text()
    missing = sorted(v for v in read if f"`{v}`" not in page)
    assert read and not missing, missing
    # and every per-field override is on the page (MEMASCEND_<SECTION>_<FIELD>)
    assert "`MEMASCEND_ENGINE_QUEUE_DEPTH`" in page and "`MEMASCEND_POOL_HUGE_PAGES`" in page
