"""Weight presets: named objective weights, optionally pinned to head versions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from mavis_lc.errors import (
    ConfigurationError,
    NotFoundError,
    RegistryError,
)
from mavis_lc.registry.models import (
    Objective,
    Preset,
)
from mavis_lc.registry.records import (
    PresetInfo,
    _aware,
)
from mavis_lc.registry.specs import parse_spec, validate_name
from mavis_lc.registry.versions import VersionsMixin
from mavis_lc.weights import validate_weights


class PresetsMixin(VersionsMixin):
    """Presets of a `Registry` (pinned specs are checked against its versions)."""

    def create_preset(
        self,
        name: str,
        weights: Mapping[str, float],
        pinned_specs: Iterable[str] | None = None,
        *,
        replace: bool = False,
    ) -> PresetInfo:
        """Save named weights. Every weighted objective must be registered; each pinned spec
        must resolve now and name a weighted objective, at most one per objective.

        Raises:
            SpecError: a bad preset name or pinned spec.
            UnknownObjectiveError, InvalidWeightError: from ``validate_weights``.
            NotFoundError: a pinned spec does not resolve.
            RegistryError: the preset exists and ``replace`` is false, or two pins share an objective.
        """
        preset_name = validate_name(name, "preset name")
        with self._sessions() as session:
            registered = session.scalars(select(Objective.name)).all()
        clean = validate_weights(weights, registered)
        pins: list[str] = []
        pinned_objectives: set[str] = set()
        for text in pinned_specs or ():
            head = parse_spec(text)
            if head.objective not in clean:
                raise ConfigurationError(
                    f"pinned spec {text!r} names {head.objective!r}, which the weights do not: "
                    f"{', '.join(sorted(clean)) or '(none)'}"
                )
            if head.objective in pinned_objectives:
                raise RegistryError(f"objective {head.objective!r} is pinned twice")
            pinned_objectives.add(head.objective)
            self.resolve(head)
            pins.append(str(head))
        with self._sessions.begin() as session:
            existing = session.scalar(select(Preset).where(Preset.name == preset_name))
            if existing is not None and not replace:
                raise RegistryError(f"preset {preset_name!r} exists; pass replace=True to overwrite it")
            if existing is not None:
                session.delete(existing)
                session.flush()
            row = Preset(name=preset_name, weights=clean, pinned_specs=pins or None)
            session.add(row)
            session.flush()
            return self._preset_info(row)

    def get_preset(self, name: str) -> PresetInfo:
        """The preset ``name``.

        Raises:
            NotFoundError: no such preset (the message lists the presets).
        """
        with self._sessions() as session:
            return self._preset_info(self._preset_row(session, name))

    def list_presets(self) -> list[PresetInfo]:
        """Every preset, by name."""
        with self._sessions() as session:
            return [self._preset_info(row) for row in session.scalars(select(Preset).order_by(Preset.name))]

    def delete_preset(self, name: str) -> None:
        """Remove the preset ``name``.

        Raises:
            NotFoundError: no such preset.
        """
        with self._sessions.begin() as session:
            session.delete(self._preset_row(session, name))

    @staticmethod
    def _preset_row(session: Session, name: str) -> Preset:
        key = name.strip().lower() if isinstance(name, str) else name
        row = session.scalar(select(Preset).where(Preset.name == key))
        if row is None:
            known = session.scalars(select(Preset.name).order_by(Preset.name)).all()
            raise NotFoundError(f"unknown preset {name!r}; presets: {', '.join(known) or '(none)'}")
        return row

    @staticmethod
    def _preset_info(row: Preset) -> PresetInfo:
        return PresetInfo(
            name=row.name,
            weights={key: float(value) for key, value in row.weights.items()},
            pinned_specs=tuple(row.pinned_specs or ()),
            created_at=_aware(row.created_at) or row.created_at,
        )
