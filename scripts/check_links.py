"""Check that every relative link in README.md and docs/*.md names an existing file (and, for a Markdown
file, an existing heading anchor). Run from the repository root: python scripts/check_links.py"""

import re
import sys
from pathlib import Path


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page.resolve()
        if not linked.exists():
            broken.append(f"{page}: no such file: {target}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{page}: no such heading: {target}")
    return broken


def main() -> int:
    pages = [Path("README.md"), *sorted(Path("docs").glob("*.md"))]
    broken = [line for page in pages for line in broken_links(page)]
    print("\n".join(broken) or f"all links resolve ({len(pages)} pages)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
