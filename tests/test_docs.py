"""The documentation cannot drift from the code: the config reference is the code's, every relative link (and
its #anchor) resolves. (Every command line in the README and docs/ is parsed by the real parsers in
tests/test_faults.py, test_every_command_line_in_the_readme_parses_and_loads_its_config.)"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_config_reference_is_generated_from_the_code():
    from cprec import reference

    assert reference.PAGE.read_text() == reference.render(), \
        "docs/reference.md differs from the config dataclasses: run `python -m cprec.reference`"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens (code blocks skipped)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    found = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_readme_stays_a_readme():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 12_000, f"README.md has {len(text):,} characters; the details belong under docs/"
    assert not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", re.sub(r"```.*?```", "", text, flags=re.S)), "no commit hashes"


def documented_keys() -> set[str]:
    from cprec import reference

    return {key for _, _, cls in reference.configs() for key, *_ in reference.rows(cls)}


def test_every_key_named_in_a_hand_written_key_table_exists():
    """The pages keep tables of notes on some keys beside the generated reference: each key they name must
    still be a key (a dotted key, its last part, or a prefix with `.*`)."""
    keys = documented_keys()
    stale = []
    for page in PAGES:
        if page.name == "reference.md":
            continue
        text = page.read_text(encoding="utf-8")
        for table in re.findall(r"^\| key \|.*?\n(?:\|.*\n)+", text, re.M):
            for row in table.splitlines()[2:]:
                for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
                    name = re.sub(r"\.(\*|<\w+>)$", "", name)
                    if not any(k == name or k.endswith("." + name) or k.startswith(name + ".") for k in keys):
                        stale.append(f"{page.relative_to(REPO)}: {name}")
    assert not stale, "keys in the docs that no config has: " + ", ".join(stale)
