"""Settings read from ``MAVIS_*`` environment variables, each with an embedded default.

The defaults make a single machine work with nothing installed beside the package: a SQLite
registry and a local artifact folder under ``MAVIS_HOME``, no broker (training jobs run in
the calling process through the same task code), and the packaged SmolLM2 base model.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGED_BASE_MODEL = "smollm2-135m-instruct"


def _default_home() -> Path:
    return Path.home() / ".mavis"


class Settings(BaseSettings):
    """Process-wide settings. Read once; call ``get_settings.cache_clear()`` after changing the environment."""

    model_config = SettingsConfigDict(env_prefix="MAVIS_", extra="ignore")

    home: Path = Field(default_factory=_default_home)
    """Folder for the embedded defaults (registry database, artifacts, model cache)."""
    database_url: SecretStr | None = None
    """SQLAlchemy URL of the registry; default ``sqlite:///$MAVIS_HOME/registry.db``."""
    artifacts: str | None = None
    """Artifact store root: a local folder or any fsspec URL; default ``$MAVIS_HOME/artifacts``."""
    cache_dir: Path | None = None
    """Where converted base models are cached; default ``$MAVIS_HOME/cache``."""
    broker_url: SecretStr | None = None
    """Celery broker (e.g. ``redis://host:6379/0``); unset means jobs run in-process."""
    result_backend: SecretStr | None = None
    """Celery result backend; defaults to the broker URL."""
    base_model: str = PACKAGED_BASE_MODEL
    """Base model: the packaged SmolLM2, a local HF model directory, or a hub id."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``."""
    trust_remote_code: bool = False
    """Allow model code from a model directory to run. Off unless you trust the directory."""
    engine_cache_size: int = Field(default=4, ge=1)
    """Loaded engines (base model + head set) kept per process, least recently used dropped first."""
    max_batch_size: int = Field(default=32, ge=1)
    """Most rows one engine decodes together when it merges concurrent requests (a single
    request with more prompts runs alone, in one batch of its own size)."""
    max_queue: int = Field(default=256, ge=1)
    """Most requests waiting for one engine; a request past it gets `EngineBusyError`."""
    batch_wait_ms: float = Field(default=10.0, ge=0.0, le=1000.0)
    """How long a request that finds its engine idle waits for others to join its batch (0:
    starts at once; requests that arrive while a batch decodes join the next one, without
    waiting). Concurrent callers' requests arrive spread over a few milliseconds."""

    compile: bool = False
    """Decode through a static KV cache and a `torch.compile`d step (`mavis_lc.decoding.static_step`):
    each (batch size, cache length bucket) shape compiles once per process, tens of seconds on CPU,
    before it runs faster; where compilation is unavailable the step runs eagerly, with a logged reason."""
    pack_weights: bool = False
    """With ``compile``: the compiled step's large linear layers run on oneDNN-packed copies of
    their weights (CPU, float32), for one more copy of those weights in memory (304 MiB for SmolLM2):
    faster decode steps on some CPUs, slower on others (docs/benchmarks.md). Ignored without ``compile``."""
    few_rows_kernel: bool = True
    """With ``compile``: the compiled step's linear layers run the few-rows kernel
    (`mavis_lc.decoding.few_rows`) on CPU in float32 where it is available (AVX-512; built once per
    machine, about 20 s); false keeps MKL's `F.linear`. Ignored without ``compile``."""

    def resolved_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.home / 'registry.db'}"

    def resolved_artifacts(self) -> str:
        return self.artifacts if self.artifacts else str(self.home / "artifacts")

    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.home / "cache"

    def resolved_broker_url(self) -> str | None:
        return self.broker_url.get_secret_value() if self.broker_url is not None else None

    def resolved_result_backend(self) -> str | None:
        if self.result_backend is not None:
            return self.result_backend.get_secret_value()
        return self.resolved_broker_url()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings()
