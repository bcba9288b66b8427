"""Process-level cache of loaded decoders, shared by every LangChain object that names them.

LangChain rebuilds model objects freely (``configurable_fields``, ``bind``, copies), so the
base model and value heads live here, keyed by what identifies them (base model, device,
dtype, and each head's artifact sha256), and every object pointing at the same ones shares
one `MavisEngine`. The engine's lock serialises decoding, so concurrent sync or async calls
cannot interleave on the shared KV cache or generators.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, Generation, MavisDecoder, StreamStep
from mavis_lc.errors import ModelLoadError
from mavis_lc.grammar import Grammar
from mavis_lc.value_model import load_value_model
from mavis_lc.weights import Weights


@dataclass(frozen=True)
class HeadSource:
    """Where a value head came from: a file, or a registry version."""

    spec: str
    """What the user wrote: a path, or a registry spec such as ``positivity@production``."""
    objective: str
    sha256: str
    path: Path
    version: int | None = None
    """Registry version number, for heads resolved through the registry."""


def resolve_head(spec: str, database_url: str | None = None) -> HeadSource:
    """Turn a head spec into a verified local file.

    A spec naming an existing ``.safetensors`` file is read directly; anything else is a
    registry spec (``objective``, ``objective@3``, ``objective@alias``) resolved and verified
    (sha256) through the registry.
    """
    path = Path(spec).expanduser()
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"value head file {spec!r} does not exist")
        from mavis_lc.value_model import read_head_config

        config, _ = read_head_config(path)
        return HeadSource(spec, config.objective, _sha256(path), path)
    from mavis_lc.registry import Registry

    registry = Registry(database_url)
    info = registry.resolve(spec)
    local = registry.fetch_artifact(info)
    return HeadSource(spec, info.objective, info.sha256, Path(local), info.version)


class MavisEngine:
    """A `MavisDecoder` plus the lock that makes it safe to share across threads."""

    def __init__(self, base: BaseModel, sources: Sequence[HeadSource]) -> None:
        heads = [load_value_model(s.path, base) for s in sources]
        self.decoder = MavisDecoder(base, heads)
        self.sources = list(sources)
        self.lock = threading.Lock()

    @property
    def base(self) -> BaseModel:
        return self.decoder.base

    @property
    def objectives(self) -> list[str]:
        return self.decoder.objectives

    def heads_info(self) -> list[dict[str, object]]:
        """The heads in use, as recorded in LangChain generation metadata."""
        return [
            {"objective": s.objective, "spec": s.spec, "version": s.version, "sha256": s.sha256} for s in self.sources
        ]

    def generate(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None,
        config: DecodeConfig,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | None] | None = None,
    ) -> list[Generation]:
        with self.lock:
            return self.decoder.generate(prompts, weights, config, seeds=seeds, grammars=grammars)

    def stream(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None,
        config: DecodeConfig,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | None] | None = None,
    ) -> Iterator[StreamStep]:
        with self.lock:
            yield from self.decoder.stream(prompts, weights, config, seeds=seeds, grammars=grammars)


_ENGINES: dict[tuple[object, ...], MavisEngine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(
    base_model: str | None,
    heads: Sequence[str],
    *,
    device: str | None = None,
    dtype: str | None = None,
    database_url: str | None = None,
) -> MavisEngine:
    """The shared engine for this base model and these heads, loading them on first use."""
    base = load_base_model(base_model, device=device, dtype=dtype)
    sources = [resolve_head(spec, database_url) for spec in heads]
    key = (base.model_id, str(base.device), str(base.dtype), tuple(sorted(s.sha256 for s in sources)))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = MavisEngine(base, sources)
        return engine


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
