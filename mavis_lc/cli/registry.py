"""``mavis registry ...``: value-head versions, aliases and presets from the command line.

It reads ``MAVIS_DATABASE_URL`` and ``MAVIS_ARTIFACTS``. Typed errors are printed as
one line on stderr with exit status 1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.table import Table

from mavis_lc.cli.common import (
    console,
    errors,
    plain,
    print_json_lines,
)
from mavis_lc.objectives.builtin import stale_definition
from mavis_lc.registry import Registry, VersionInfo
from mavis_lc.weights import parse_weights

registry_app = typer.Typer(help="Value-head versions, aliases and presets.", no_args_is_help=True)
alias_app = typer.Typer(help="Point names such as 'production' at versions.", no_args_is_help=True)
presets_app = typer.Typer(help="Named objective weights.", no_args_is_help=True)
registry_app.add_typer(alias_app, name="alias")
registry_app.add_typer(presets_app, name="presets")


@contextmanager
def _registry() -> Iterator[Registry]:
    """A registry from settings; typed errors become a one-line message and exit status 1."""
    with errors(), Registry() as registry:
        yield registry


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if value else ""


LISTED_METRICS = ("within_prompt_r2", "sibling_corr", "r2", "val_mse")
"""Fit metrics the version list shows (``mavis registry show`` prints them all)."""


def _key_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{name} {metrics[name]:.3g}" for name in LISTED_METRICS if isinstance(metrics.get(name), float | int)
    )


def _versions_table(title: str, versions: list[VersionInfo], aliases: dict[int, list[str]]) -> Table:
    table = Table(title=title)
    for column in ("spec", "status", "iteration", "aliases", "validation fit", "sha256", "created"):
        table.add_column(column, no_wrap=column in ("spec", "sha256", "created"))
    for info in versions:
        table.add_row(
            info.spec,
            info.status,
            str(info.iteration),
            ", ".join(aliases.get(info.id, [])),
            _key_metrics(info.metrics),
            info.sha256[:12],
            info.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


@registry_app.command("objectives")
def objectives(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per objective.")] = False,
) -> None:
    """List objectives with their version counts and aliases."""
    with _registry() as registry:
        if as_json:
            print_json_lines(registry.list_objectives())
            return
        table = Table(title="objectives")
        for column in ("objective", "versions", "latest ready", "aliases", "reward range", "description"):
            table.add_column(column)
        for info in registry.list_objectives():
            table.add_row(
                info.name,
                str(info.version_count),
                str(info.latest_ready_version or "-"),
                ", ".join(f"{alias}->{version}" for alias, version in info.aliases.items()),
                f"[{info.reward_range[0]}, {info.reward_range[1]}]" if info.reward_range else "",
                info.description or "",
            )
        console.print(table)


@registry_app.command("list")
def list_versions(
    objective: Annotated[str | None, typer.Argument(help="Only this objective.")] = None,
    archived: Annotated[bool, typer.Option("--archived/--no-archived", help="Include archived.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per version.")] = False,
) -> None:
    """List versions with status, metrics and aliases."""
    with _registry() as registry:
        versions = registry.list_versions(objective, include_archived=archived)
        aliases: dict[int, list[str]] = {}
        for name in sorted({info.objective for info in versions}):
            by_version = {info.version: info.id for info in versions if info.objective == name}
            for alias, version in registry.list_aliases(name).items():
                aliases.setdefault(by_version.get(version, -1), []).append(alias)
        if as_json:
            print_json_lines([{**plain(v), "aliases": sorted(aliases.get(v.id, []))} for v in versions])
            return
        console.print(_versions_table("versions", versions, aliases))


@registry_app.command("show")
def show(
    spec: Annotated[str, typer.Argument(help="e.g. positivity, positivity@3, positivity@production")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the version as one JSON object.")] = False,
) -> None:
    """Show one version: metadata, metrics, normalisation, aliases and lineage."""
    with _registry() as registry:
        detail = registry.show(spec)
        info = detail.version
        if as_json:
            print_json_lines([plain(detail)])
            return
        table = Table(title=info.spec, show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        rows: list[tuple[str, str]] = [
            ("status", info.status),
            ("aliases", ", ".join(detail.aliases)),
            ("iteration", str(info.iteration)),
            ("base model", info.base_model_id),
            ("tokenizer", info.tokenizer_fingerprint),
            ("artifact", info.artifact_uri),
            ("sha256", info.sha256),
            ("size (bytes)", str(info.size_bytes)),
            ("architecture", _json(info.architecture)),
            ("training beta", _training_beta(info.training_params)),
            ("reward definition", _definition(info.objective, info.training_params)),
            ("within-state fit", _within_state(info.metrics)),
            ("training params", _json(info.training_params)),
            ("metrics", _json(info.metrics)),
            ("normalization", _json(info.normalization)),
            ("training job", info.training_job_id or ""),
            ("created", info.created_at.isoformat()),
            ("parents", ", ".join(parent.spec for parent in detail.parents)),
            ("children", ", ".join(child.spec for child in detail.children)),
        ]
        for name, value in rows:
            table.add_row(name, value)
        console.print(table)


def _definition(objective: str, params: dict[str, Any]) -> str:
    """The version of the reward definition the head was trained on, and whether it is stale."""
    stale = stale_definition(objective, params)
    return f"v{params.get('objective_version', 1)}" + (f" ({stale})" if stale else "")


def _training_beta(params: dict[str, Any]) -> str:
    """The beta the head was trained to decode with, and the zeta of its soft targets."""
    if "beta" not in params:
        return ""
    zeta = params.get("zeta")
    return f"{params['beta']:g} (decode at this beta; soft targets with zeta {zeta if zeta is None else f'{zeta:g}'})"


def _within_state(metrics: dict[str, Any]) -> str:
    """The validation metrics on what the tilt uses (differences of Q within a state)."""
    names = {
        "within_prompt_r2": "within-prompt R²",
        "sibling_corr": "sibling-difference corr",
        "sibling_sign_agreement": "sign agreement",
        "candidate_noise_ceiling": "its ceiling",
        "sibling_noise_ceiling": "root-pair ceiling",
        "sibling_pairs": "pairs",
        "phi_corr": "agreement with the prefix reward",
    }
    return ", ".join(f"{label} {metrics[name]:.3g}" for name, label in names.items() if name in metrics)


@registry_app.command("archive")
def archive(spec: Annotated[str, typer.Argument(help="The version to archive, e.g. positivity@3")]) -> None:
    """Archive a version: it no longer resolves as the newest, but stays loadable by number or alias."""
    with _registry() as registry:
        info = registry.archive(spec)
        console.print(f"archived {info.spec}")


@alias_app.command("set")
def alias_set(objective: str, alias: str, version: int) -> None:
    """Point OBJECTIVE@ALIAS at VERSION (creates or moves the alias)."""
    with _registry() as registry:
        info = registry.set_alias(objective, alias, version)
        console.print(f"{info.objective}@{alias.lower()} -> {info.version}")


@alias_app.command("delete")
def alias_delete(objective: str, alias: str) -> None:
    """Remove OBJECTIVE@ALIAS."""
    with _registry() as registry:
        registry.delete_alias(objective, alias)
        console.print(f"deleted {objective.lower()}@{alias.lower()}")


@presets_app.command("create")
def presets_create(
    name: str,
    weights: Annotated[str, typer.Argument(help="e.g. positivity=0.7,conciseness=0.3")],
    pin: Annotated[list[str] | None, typer.Option("--pin", help="Pin a head spec (repeatable).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite an existing preset.")] = False,
) -> None:
    """Save named weights, optionally pinning head versions."""
    with _registry() as registry:
        preset = registry.create_preset(name, parse_weights(weights), pin, replace=replace)
        console.print(f"saved preset {preset.name}")


@presets_app.command("list")
def presets_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per preset.")] = False,
) -> None:
    """List presets."""
    with _registry() as registry:
        if as_json:
            print_json_lines(registry.list_presets())
            return
        table = Table(title="presets")
        for column in ("preset", "weights", "pinned"):
            table.add_column(column)
        for preset in registry.list_presets():
            table.add_row(preset.name, _weights_text(preset.weights), ", ".join(preset.pinned_specs))
        console.print(table)


@presets_app.command("show")
def presets_show(
    name: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the preset as one JSON object.")] = False,
) -> None:
    """Show one preset."""
    with _registry() as registry:
        preset = registry.get_preset(name)
        if as_json:
            print_json_lines([preset])
            return
        table = Table(title=preset.name)
        for column in ("objective", "weight", "pinned"):
            table.add_column(column)
        pins = {spec.split("@", 1)[0]: spec for spec in preset.pinned_specs}
        for objective, weight in sorted(preset.weights.items()):
            table.add_row(objective, f"{weight:g}", pins.get(objective, ""))
        console.print(table)


@presets_app.command("delete")
def presets_delete(name: str) -> None:
    """Delete a preset."""
    with _registry() as registry:
        registry.delete_preset(name)
        console.print(f"deleted preset {name.lower()}")


def _weights_text(weights: dict[str, float]) -> str:
    return ",".join(f"{name}={value:g}" for name, value in sorted(weights.items()))
