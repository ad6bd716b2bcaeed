"""``docs/plugin-authoring.md`` shows the files of ``plugins/_template/`` as they are."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("plugin_doc", ROOT / "tools" / "plugin_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugin_authoring_guide_splices_the_current_template():
    tool = _tool()
    text = tool.DOC.read_text()
    assert tool.render(text) == text, "docs/plugin-authoring.md is out of date: run python tools/plugin_doc.py"


def test_guide_shows_every_file_of_the_template():
    tool = _tool()
    shown = set(tool.spliced_paths(tool.DOC.read_text()))
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "plugins" / "_template").rglob("*")
             if p.is_file() and p.suffix in (".py", ".toml") and "__pycache__" not in p.parts}
    assert files and shown == files
