"""Docs that run: every ``mavis`` command in README.md and docs/*.md parses against the CLI, and
every Python snippet's imports import."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from mavis_lc.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console", ""}
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced block and every indented (4-space) block."""
    out: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
            out.append((fence.group(1), lines[i + 1 : end]))
            i = end + 1
            continue
        if lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            out.append(("", [line[4:] for line in lines[i:end]]))
            i = end
            continue
        i += 1
    return out


def commands(lines: list[str]) -> list[list[str]]:
    """The ``mavis`` invocations of a shell block, as argument lists (continuations joined,
    comments, prompts and leading variable assignments dropped)."""
    joined: list[str] = []
    buffer = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        joined.append(buffer + line)
        buffer = ""
    found = []
    for line in joined:
        lexer = shlex.shlex(line.strip().removeprefix("$ "), posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)  # comments (#) dropped
        except ValueError:
            continue
        command: list[str] = []
        for token in [*tokens, ";"]:
            if token not in (";", "&&", "||", "|", "&"):
                command.append(token)
                continue
            while command and ENV.match(command[0]):
                command = command[1:]
            if command and command[0] == "mavis":
                found.append(command[1:])
            command = []
    return found


def all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for language, lines in blocks(path.read_text()):
            if language in SHELL:
                found += [(f"{path.name}: mavis {' '.join(c)}", c) for c in commands(lines)]
    return found


def python_snippets() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for n, (language, lines) in enumerate(blocks(path.read_text())):
            if language == "python":
                found.append((f"{path.name} block {n}", "\n".join(lines)))
    return found


def parse(args: list[str]) -> None:
    """Parse ``args`` as the CLI would, down to the leaf command, without running it.

    Raises:
        UsageError (typer's click): an unknown command or option, or a bad value.
    """
    command: Any = typer.main.get_command(app)  # typer's own click: groups have resolve_command
    ctx = command.make_context("mavis", list(args), resilient_parsing=False)
    while hasattr(command, "resolve_command"):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        command = sub
        ctx = command.make_context(name, rest, parent=ctx, resilient_parsing=False)


def test_the_parser_refuses_what_the_cli_refuses() -> None:
    for bad in (["registry", "presets", "create", "x", "--bogus"], ["trian", "x"], ["train", "p", "--epochz", "3"]):
        with pytest.raises(Exception, match=r"No such (option|command)"):
            parse(bad)
    parse(["train", "positivity", "--epochs", "3"])


def test_commands_are_split_like_a_shell_splits_them() -> None:
    lines = ["A=1 mavis jobs list; mavis jobs show X && echo done  # a comment", "mavis train p \\", "  --epochs 2"]
    assert commands(lines) == [["jobs", "list"], ["jobs", "show", "X"], ["train", "p", "--epochs", "2"]]


def test_the_docs_show_mavis_commands() -> None:
    found = all_commands()
    assert len(found) >= 20, [f for f, _ in found]
    assert any(c[:1] == ["train"] for _, c in found) and any(c[:1] == ["registry"] for _, c in found)


@pytest.mark.parametrize(("where", "args"), all_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_mavis_command_parses(where: str, args: list[str]) -> None:
    try:
        parse(args)
    except Exception as exc:
        if type(exc).__name__ == "Exit":  # --help, --version
            return
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        pytest.fail(f"{where}: {message}")


@pytest.mark.parametrize(("where", "code"), python_snippets(), ids=lambda v: v if " block " in str(v) else None)
def test_every_python_snippets_imports_import(where: str, code: str) -> None:
    imports = [
        line.strip()
        for line in code.splitlines()
        if re.match(r"^\s*(from \S+ import .+|import \S+)", line) and not line.rstrip().endswith("(")
    ]
    for statement in imports:
        try:
            exec(statement, {})
        except ImportError as exc:
            pytest.fail(f"{where}: {statement!r} fails: {exc}")


def test_no_docstring_points_at_a_file_that_does_not_exist() -> None:
    missing = []
    for path in [*ROOT.glob("mavis_lc/**/*.py"), *ROOT.glob("worker/*.py")]:
        for name in re.findall(r"\b(docs/[\w-]+\.md|[A-Z][A-Z_-]*\.md)\b", path.read_text()):  # docs, not outputs
            if not (ROOT / name).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == []
