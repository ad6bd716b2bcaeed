"""Splice the files of ``plugins/_template/`` into ``docs/plugin-authoring.md``.

The guide marks each spliced file with ``<!-- template: <path> -->`` ... ``<!-- /template -->``;
everything between the two markers is replaced by the file, fenced. ``python tools/plugin_doc.py``
rewrites the guide; ``--check`` only reports (exit status 1) whether it is out of date, which
``tests/test_plugin_doc.py`` runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugin-authoring.md"
TEMPLATE = ROOT / "plugins" / "_template"
MARKED = re.compile(r"(?P<open><!-- template: (?P<path>\S+) -->\n)(?P<body>.*?)(?P<close><!-- /template -->)", re.S)
LANGUAGES = {".py": "python", ".toml": "toml"}


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every marked section replaced by the current file it names."""

    def splice(match: re.Match[str]) -> str:
        path = root / match["path"]
        if not path.is_relative_to(TEMPLATE) or not path.is_file():
            raise SystemExit(f"{DOC.name}: {match['path']!r} is not a file of {TEMPLATE.relative_to(root)}")
        fence = LANGUAGES.get(path.suffix, "")
        return f"{match['open']}```{fence}\n{path.read_text()}```\n{match['close']}"

    return MARKED.sub(splice, text)


def spliced_paths(text: str) -> list[str]:
    return [match["path"] for match in MARKED.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the guide is up to date")
    args = parser.parse_args(argv)
    current = DOC.read_text()
    wanted = render(current)
    if current == wanted:
        return 0
    if args.check:
        print(f"{DOC.relative_to(ROOT)} is out of date with plugins/_template; run python tools/plugin_doc.py",
              file=sys.stderr)
        return 1
    DOC.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
