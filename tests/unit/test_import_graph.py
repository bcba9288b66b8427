"""The package's import graph has no circles, and imports point down the flow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["import_graph"] = module
    spec.loader.exec_module(module)
    return module


def test_the_package_has_no_import_circle() -> None:
    tool = _tool()
    graph = tool.build_graph(ROOT)
    assert "mavis_lc.value_models.loading" in graph and "mavis_lc.cli.train" in graph
    assert tool.circles(graph) == []


def test_a_circle_is_found_even_through_a_lazy_import_or_a_package_init(tmp_path: Path) -> None:
    tool = _tool()
    pkg = tmp_path / "mavis_lc"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from mavis_lc.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from mavis_lc import a  # lazy\n")
    (pkg / "sub" / "__init__.py").write_text("from mavis_lc.sub.inner import x\n")
    (pkg / "sub" / "inner.py").write_text("from mavis_lc.c import y\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mavis_lc.a import z\n"
        "from mavis_lc.sub import x\n"
    )
    found = tool.circles(tool.build_graph(tmp_path))
    assert sorted(found) == [["mavis_lc.a", "mavis_lc.b"], ["mavis_lc.c", "mavis_lc.sub", "mavis_lc.sub.inner"]]


def test_imports_point_down_the_flow() -> None:
    folders = _tool().folder_graph(_tool().build_graph(ROOT))
    below = {
        "mavis_lc.value_models": {"mavis_lc.decoding", "mavis_lc.training", "mavis_lc.registry", "mavis_lc.langchain"},
        "mavis_lc.decoding": {"mavis_lc.langchain", "mavis_lc.training", "mavis_lc.cli", "mavis_lc.service"},
        "mavis_lc.training": {"mavis_lc.decoding", "mavis_lc.registry", "mavis_lc.langchain", "mavis_lc.cli"},
        "mavis_lc.registry": {"mavis_lc.decoding", "mavis_lc.training", "mavis_lc.langchain", "mavis_lc.cli"},
        "mavis_lc.langchain": {"mavis_lc.training", "mavis_lc.cli", "mavis_lc.service", "mavis_lc.runner"},
    }
    for folder, forbidden in below.items():
        assert not folders[folder] & forbidden, (folder, folders[folder] & forbidden)
