"""``mavis registry ...`` and ``mavis db ...`` through Typer's test runner (MAVIS_HOME per test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mavis_lc.cli.db import db_app
from mavis_lc.cli.registry import registry_app
from mavis_lc.registry import Registry
from tests.unit.test_registry_api import register

app = typer.Typer()
app.add_typer(registry_app, name="registry")
app.add_typer(db_app, name="db")
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


@pytest.fixture
def registry(mavis_home: Path) -> Registry:
    registry = Registry()  # the same database and store the CLI reads from settings
    register(
        registry, "positivity", b"one",
        metrics={"val_mse": 0.125, "n_train": 100.0, "within_prompt_r2": 0.3125, "sibling_corr": 0.4375},
        training_params={"beta": 4.0, "zeta": 0.25},
    )  # fmt: skip
    register(registry, "positivity", b"two", parents=[1])
    register(registry, "conciseness", b"three")
    return registry


def test_db_upgrade_then_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code, output = invoke("db", "check", "--url", url)
    assert code == 1 and "database is at revision (none), the newest is 0002" in output
    code, output = invoke("db", "upgrade", "--url", url)
    assert code == 0 and "revision 0002" in output
    code, output = invoke("db", "check", "--url", url)
    assert code == 0 and "no differences" in output


def test_objectives_and_list(registry: Registry) -> None:
    code, output = invoke("registry", "objectives")
    assert code == 0
    assert "conciseness" in output and "positivity" in output
    code, output = invoke("registry", "list", "positivity")
    assert code == 0
    assert "positivity@1" in output and "positivity@2" in output and "conciseness@1" not in output
    assert "val_mse 0.125" in output and "n_train" not in output  # the list shows the fit metrics only


def test_show_has_metrics_and_lineage(registry: Registry) -> None:
    code, output = invoke("registry", "show", "positivity@1")
    assert code == 0
    assert "0.125" in output
    assert "children" in output and "positivity@2" in output
    assert "4 (decode at this beta; soft targets with zeta 0.25)" in output
    assert "within-prompt R² 0.312, sibling-difference corr 0.438" in output
    assert "reward definition │ v1 " in output and "current definition" not in output  # positivity has one
    code, output = invoke("registry", "show", "conciseness@1")  # registered before definition versions
    assert code == 0 and "definition v1 of the 'conciseness' reward; the current definition is v2" in output


def test_alias_set_move_delete(registry: Registry) -> None:
    assert invoke("registry", "alias", "set", "positivity", "production", "1") == (0, "positivity@production -> 1\n")
    assert invoke("registry", "alias", "set", "positivity", "production", "2")[0] == 0
    assert registry.resolve("positivity@production").version == 2
    assert invoke("registry", "alias", "delete", "positivity", "production")[0] == 0
    code, output = invoke("registry", "alias", "delete", "positivity", "production")
    assert code == 1 and "no alias 'production'" in output


def test_archive(registry: Registry) -> None:
    assert invoke("registry", "archive", "positivity@2") == (0, "archived positivity@2\n")
    assert registry.resolve("positivity").version == 1


def test_presets(registry: Registry) -> None:
    code, _ = invoke(
        "registry", "presets", "create", "friendly", "positivity=0.7,conciseness=0.3", "--pin", "positivity@1"
    )
    assert code == 0
    assert registry.get_preset("friendly").weights == {"positivity": 0.7, "conciseness": 0.3}
    code, output = invoke("registry", "presets", "list")
    assert code == 0 and "conciseness=0.3,positivity=0.7" in output and "positivity@1" in output
    code, output = invoke("registry", "presets", "show", "friendly")
    assert code == 0 and "0.7" in output
    assert invoke("registry", "presets", "delete", "friendly") == (0, "deleted preset friendly\n")
    code, output = invoke("registry", "presets", "show", "friendly")
    assert code == 1 and "unknown preset 'friendly'" in output


def test_typed_errors_exit_1_with_one_line(registry: Registry) -> None:
    code, output = invoke("registry", "show", "humor")
    assert code == 1
    assert output.strip() == "error: unknown objective 'humor'; registered: conciseness, positivity"
    code, output = invoke("registry", "show", "positivity@@")
    assert code == 1 and "accepted forms" in output
    code, output = invoke("registry", "presets", "create", "x", "positivity=-1")
    assert code == 1 and "must be finite and >= 0" in output


def test_read_commands_print_json(registry: Registry) -> None:
    import json

    registry.set_alias("positivity", "prod", 2)
    registry.create_preset("friendly", {"positivity": 0.7}, pinned_specs=["positivity@1"])
    lines = lambda *args: [json.loads(line) for line in invoke(*args, "--json")[1].splitlines()]  # noqa: E731
    objectives = lines("registry", "objectives")
    assert [(o["name"], o["version_count"]) for o in objectives] == [("conciseness", 1), ("positivity", 2)]
    versions = lines("registry", "list", "positivity")
    assert sorted((v["version"], v["aliases"]) for v in versions) == [(1, []), (2, ["prod"])]
    [shown] = lines("registry", "show", "positivity@1")
    assert shown["version"]["metrics"]["val_mse"] == 0.125 and [c["version"] for c in shown["children"]] == [2]
    assert lines("registry", "presets", "list")[0]["pinned_specs"] == ["positivity@1"]
    assert lines("registry", "presets", "show", "friendly")[0]["weights"] == {"positivity": 0.7}


def test_an_error_naming_an_extra_keeps_its_brackets(mavis_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The registry at a PostgreSQL URL without psycopg: the message names mavis-lc[postgres],
    # which rich markup would otherwise swallow as a tag.
    monkeypatch.setenv("MAVIS_DATABASE_URL", "postgresql://user@127.0.0.1:1/db")
    import sys

    from mavis_lc.settings import get_settings

    get_settings.cache_clear()
    monkeypatch.setitem(sys.modules, "psycopg", None)  # not installed
    code, output = invoke("registry", "objectives")
    assert code == 1 and "pip install 'mavis-lc[postgres]'" in " ".join(output.split())
