"""The repository documents itself: every relative link in its Markdown files points at a file or folder that
exists (a moved report or a renamed page breaks no link)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# [text](target) and [text](target "title"); images too. Targets with a scheme or only an anchor are not files.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _markdown_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked Markdown files are unknown")
    return [ROOT / name for name in listed]


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)  # code blocks hold no links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    return broken


def test_every_relative_link_in_the_markdown_files_resolves():
    files = _markdown_files()
    assert any(path.name == "README.md" for path in files)
    broken = {str(path.relative_to(ROOT)): links for path in files if (links := broken_links(path))}
    assert not broken, f"links to files that do not exist: {broken}"


def test_a_link_to_a_moved_file_is_reported(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "here.md").write_text("x")
    page.write_text("[ok](here.md#part) [gone](old/report.md) [web](https://example.org) [anchor](#x)\n")
    assert broken_links(page) == ["old/report.md"]
