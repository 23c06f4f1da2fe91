"""The README and the pages under docs/ link to each other: every relative link must reach a file, and
every #anchor a heading of that file (as GitHub renders headings into anchors), so a page moved or a
heading renamed cannot leave a newcomer at a dead link."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens kept), spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    in_code = False
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            found.add(github_anchor(m.group(1)))
    return found


def links_of(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return [target for target in LINK.findall(text) if "://" not in target and not target.startswith("mailto:")]


def test_github_anchors_are_computed_as_github_renders_them():
    assert github_anchor("Deleting on time: the expiry watch") == "deleting-on-time-the-expiry-watch"
    assert github_anchor("Prometheus rules (`deploy/prometheus/alerts.yml`)") == "prometheus-rules-deployprometheusalertsyml"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_of_a_page_reaches_a_file_and_a_heading(page):
    broken = []
    for target in links_of(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


def test_every_page_under_docs_is_linked_from_the_readme():
    readme_links = {target.partition("#")[0] for target in links_of(ROOT / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme_links]
    assert not unlinked, unlinked
