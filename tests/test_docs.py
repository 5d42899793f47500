"""The documentation's relative links and anchors resolve, and the front page stays short."""

import re

import pytest

from conftest import PLUGIN_DIR

REPO = PLUGIN_DIR.parent
README_MAX_LINES = 250


def documentation_files() -> list:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md",
             *sorted((REPO / "examples").rglob("README.md"))]
    return [path for path in files if path.is_file()]


def without_code_blocks(markdown: str) -> str:
    """The text outside fenced code blocks: a `#` line there is a shell comment, not a heading."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", markdown, flags=re.S | re.M)


def without_code(markdown: str) -> str:
    """The text outside code blocks and inline code, where `[a](b)` is no link."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(markdown))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation but '-' and '_' removed, spaces to '-'."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def anchors(markdown: str) -> set:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen, result = {}, set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", without_code_blocks(markdown), flags=re.M):
        base = slug(heading)
        result.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return result


def links(markdown: str) -> list:
    """The targets of inline links and images, external ones left out."""
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code(markdown))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, flags=re.I)]


def test_slug_follows_github():
    assert slug("`make study`: seed vs SiamCTC vs more training, with intervals") == \
        "make-study-seed-vs-siamctc-vs-more-training-with-intervals"
    assert slug("The paper's recipe with real data") == "the-papers-recipe-with-real-data"
    assert slug("Resuming, bad data, fp16") == "resuming-bad-data-fp16"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for target in links(path.read_text()):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{path.relative_to(REPO)}: " + "; ".join(broken)


def test_readme_is_a_short_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
