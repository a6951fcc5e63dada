"""The README stays a first screen and a way in (at most 250 lines; the rest lives under docs/), and every
relative link in it and in docs/ resolves: to a file that exists and, with a #fragment, to a heading of that
page (GitHub's anchors)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _outside_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, inline code kept as text, other punctuation dropped, spaces as
    hyphens, a repeated heading numbered."""
    anchors, count = set(), {}
    for line in _outside_fences(page.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(f"{slug}-{count[slug]}" if slug in count else slug)
            count[slug] = count.get(slug, 0) + 1
    return anchors


def test_the_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        prose = re.sub(r"`[^`\n]*`", "", _outside_fences(page.read_text()))  # a link in code is not a link
        for target in LINK.findall(prose):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{fragment})")
    assert not broken, "\n".join(broken)


def test_no_page_holds_a_merge_conflict():
    """A merge resolved by hand once left its markers in a page; they render as text and split its tables."""
    marker = re.compile(r"^(<{7}|={7}|>{7})( |$)", re.M)
    found = [f"{page.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
             for page in PAGES for text in [page.read_text()] for m in marker.finditer(text)]
    assert not found, found
