"""Process-level cache of loaded decoders, shared by every LangChain object that names them.

LangChain rebuilds model objects freely (``configurable_fields``, ``bind``, copies), so the
base model and value heads live here, keyed by what identifies them (base model, device,
dtype, and each head's artifact sha256), and every object pointing at the same ones shares
one `MavisEngine`. Concurrent sync or async calls to one engine share batched decodes through
its `BatchScheduler`: requests that arrive while a batch runs are merged into the next one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mavis_lc.base_model import BaseModel, LoadOptions, load_base_model
from mavis_lc.decoding.decoder import DecodeConfig, Generation, MavisDecoder, StreamStep
from mavis_lc.decoding.grammar import Grammar
from mavis_lc.decoding.scheduler import BatchScheduler
from mavis_lc.errors import ModelLoadError
from mavis_lc.objectives.builtin import stale_definition
from mavis_lc.settings import get_settings
from mavis_lc.value_models import load_value_model
from mavis_lc.weights import Weights

_LOG = logging.getLogger(__name__)


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
    """Turn a head spec into a verified local file (see `resolve_heads`)."""
    return resolve_heads([spec], database_url)[0]


def is_head_file(spec: str) -> bool:
    """Whether ``spec`` names a head file rather than a registry spec."""
    path = Path(spec).expanduser()
    return path.suffix == ".safetensors" or path.is_file()


def resolve_heads(
    specs: Sequence[str],
    database_url: str | None = None,
    registry: Any = None,
    *,
    base: BaseModel | None = None,
    allow_other_base: bool = False,
) -> list[HeadSource]:
    """Turn head specs into verified local files.

    A spec naming an existing ``.safetensors`` file is read directly; anything else is a
    registry spec (``objective``, ``objective@3``, ``objective@alias``) resolved and verified
    (sha256) through one registry (``registry``, or one opened here and closed before returning).
    Given the loaded ``base``, ``objective`` and ``@latest`` resolve among the versions trained
    on it (on its tokenizer alone with ``allow_other_base``), and a version named by number or
    alias that was trained on another base is refused (`IncompatibleHeadError`).
    """
    sources: list[HeadSource] = []
    opened = None
    try:
        for spec in specs:
            path = Path(spec).expanduser()
            if is_head_file(spec):
                if not path.is_file():
                    raise ModelLoadError(f"value head file {spec!r} does not exist")
                from mavis_lc.value_models import read_head_config

                config, _ = read_head_config(path)
                sources.append(HeadSource(spec, config.objective, _sha256(path), path))
                continue
            if registry is None:
                from mavis_lc.registry import Registry

                registry = opened = Registry(database_url)
            info = registry.resolve(
                spec,
                tokenizer_fingerprint=base.fingerprint if base is not None else None,
                weights_fingerprint=base.weights_fingerprint if base is not None and not allow_other_base else None,
            )
            stale = stale_definition(info.objective, info.training_params)
            if stale is not None:
                _LOG.warning("%s: %s", info.spec, stale)
            local = registry.fetch_artifact(info)
            sources.append(HeadSource(spec, info.objective, info.sha256, Path(local), info.version))
    finally:
        if opened is not None:
            opened.close()
    return sources


def heads_info(sources: Sequence[HeadSource]) -> list[dict[str, object]]:
    """Heads as LangChain generation metadata records them: objective, spec, version, sha256."""
    return [{"objective": s.objective, "spec": s.spec, "version": s.version, "sha256": s.sha256} for s in sources]


class MavisEngine:
    """A `MavisDecoder` shared by every thread and event loop of the process: calls go through
    its `BatchScheduler`, which merges concurrent requests into shared batches (bounded by
    ``MAVIS_MAX_BATCH_SIZE`` rows and ``MAVIS_MAX_QUEUE`` waiting requests)."""

    def __init__(self, base: BaseModel, sources: Sequence[HeadSource], *, allow_other_base: bool = False) -> None:
        heads = [load_value_model(s.path, base, allow_other_base=allow_other_base) for s in sources]
        settings = get_settings()
        self.decoder = MavisDecoder(
            base,
            heads,
            allow_other_base=allow_other_base,
            compile=settings.compile,
            pack_weights=settings.compile and settings.pack_weights,
            few_rows=settings.few_rows_kernel,
        )
        self.sources = list(sources)
        self.scheduler = BatchScheduler(
            self.decoder,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            batch_wait_s=settings.batch_wait_ms / 1000,
        )

    @property
    def base(self) -> BaseModel:
        return self.decoder.base

    @property
    def objectives(self) -> list[str]:
        return self.decoder.objectives

    def generate(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None,
        config: DecodeConfig,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | None] | None = None,
    ) -> list[Generation]:
        """Decode to the end; one `Generation` per prompt (see `MavisDecoder.stream`)."""
        return self.scheduler.generate(prompts, weights, config, seeds, grammars)

    async def agenerate(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None,
        config: DecodeConfig,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | None] | None = None,
    ) -> list[Generation]:
        """As `generate`, awaited on the running loop (the decode runs on the engine's thread)."""
        return await self.scheduler.agenerate(prompts, weights, config, seeds, grammars)

    def stream(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None,
        config: DecodeConfig,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | None] | None = None,
    ) -> Iterator[StreamStep]:
        """Each step's text deltas; validation errors are raised before the first step."""
        return self.scheduler.stream(prompts, weights, config, seeds, grammars)

    def astream(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None,
        config: DecodeConfig,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | None] | None = None,
    ) -> AsyncIterator[StreamStep]:
        """As `stream`, as an async iterator."""
        return self.scheduler.astream(prompts, weights, config, seeds, grammars)


_ENGINES: OrderedDict[tuple[object, ...], MavisEngine] = OrderedDict()
_ENGINES_LOCK = threading.Lock()


def get_engine(
    base_model: str | None,
    heads: Sequence[str],
    *,
    device: str | None = None,
    dtype: str | None = None,
    database_url: str | None = None,
    options: LoadOptions | None = None,
    trust_remote_code: bool | None = None,
) -> MavisEngine:
    """The shared engine for this base model and these heads, loading them on first use.

    Registry specs are resolved on every call, among the versions trained on the base; callers
    that decode repeatedly resolve once (`resolve_heads`) and use `engine_for`."""
    load = {"device": device, "dtype": dtype, "options": options, "trust_remote_code": trust_remote_code}
    base = load_base_model(base_model, **load)  # type: ignore[arg-type]
    return engine_for(base_model, resolve_heads(heads, database_url, base=base), **load)  # type: ignore[arg-type]


def engine_for(
    base_model: str | None,
    sources: Sequence[HeadSource],
    *,
    device: str | None = None,
    dtype: str | None = None,
    allow_other_base: bool = False,
    options: LoadOptions | None = None,
    trust_remote_code: bool | None = None,
) -> MavisEngine:
    """The shared engine for this base model (loaded with ``options``) and these resolved heads
    (keyed by the loaded base and the heads' sha256s), loading it on first use. At most
    ``MAVIS_ENGINE_CACHE_SIZE`` engines are kept, the least recently used dropped first (an
    object holding one keeps it alive)."""
    base = load_base_model(base_model, device=device, dtype=dtype, options=options, trust_remote_code=trust_remote_code)
    heads = tuple(sorted(s.sha256 for s in sources))
    # Loaded bases are kept for the process's life, so the object's identity names it: two
    # directories with the same folder name, or one model with other load options, differ.
    key = (id(base), heads, allow_other_base)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = MavisEngine(base, sources, allow_other_base=allow_other_base)
        _ENGINES.move_to_end(key)
        while len(_ENGINES) > get_settings().engine_cache_size:
            _ENGINES.popitem(last=False)
        return engine


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
