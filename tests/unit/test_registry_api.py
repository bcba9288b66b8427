"""The registry API contract, run here on SQLite; tests/integration runs it on PostgreSQL."""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mavis_lc.errors import (
    ArtifactError,
    ConfigurationError,
    IncompatibleHeadError,
    InvalidWeightError,
    JobError,
    NotFoundError,
    RegistryError,
    SpecError,
    UnknownObjectiveError,
)
from mavis_lc.registry import ArtifactStore, Registry, VersionInfo
from mavis_lc.registry.store import ArtifactSource

METADATA: dict[str, Any] = {
    "base_model_id": "smollm2-135m-instruct",
    "tokenizer_fingerprint": "f" * 64,
    "architecture": {"kind": "shared", "hidden_size": 576},
    "iteration": 0,
    "training_params": {"lr": 0.001, "epochs": 3},
    "metrics": {"val_mse": 0.25},
    "normalization": {"mean": 0.5, "std": 2.0},
}


def register(registry: Registry, objective: str, content: ArtifactSource, **overrides: Any) -> VersionInfo:
    return registry.register_version(objective, content, **{**METADATA, **overrides})


def key_of(content: bytes) -> str:
    digest = hashlib.sha256(content).hexdigest()
    return f"sha256/{digest[:2]}/{digest}.safetensors"


class RegistryContract:
    """Behaviour every database backend must show. Subclasses provide the ``registry`` fixture."""

    def test_versions_count_from_one_per_objective(self, registry: Registry) -> None:
        first = register(registry, "positivity", b"head-1")
        second = register(registry, "positivity", b"head-2")
        other = register(registry, "conciseness", b"head-3")
        assert (first.version, second.version, other.version) == (1, 2, 1)
        assert [info.spec for info in registry.list_versions()] == [
            "conciseness@1",
            "positivity@1",
            "positivity@2",
        ]

    def test_registration_round_trips_every_field(self, registry: Registry) -> None:
        content = b"\x00safetensors bytes\xff"
        info = register(registry, "positivity", content, training_job_id="job-1", iteration=2)
        digest = hashlib.sha256(content).hexdigest()
        assert info.objective == "positivity" and info.status == "ready"
        assert info.sha256 == digest and info.size_bytes == len(content)
        assert info.artifact_uri == f"sha256/{digest[:2]}/{digest}.safetensors"
        assert info.iteration == 2 and info.training_job_id == "job-1"
        assert info.architecture == METADATA["architecture"]
        assert info.training_params == METADATA["training_params"]
        assert info.metrics == {"val_mse": 0.25}
        assert info.normalization == {"mean": 0.5, "std": 2.0}
        assert info.created_at.tzinfo is not None
        assert registry.resolve("positivity@1") == info
        assert registry.fetch_artifact(info).read_bytes() == content

    def test_register_from_a_file_path(self, registry: Registry, tmp_path: Path) -> None:
        source = tmp_path / "head.safetensors"
        source.write_bytes(b"from a file")
        info = register(registry, "positivity", source)
        assert info.sha256 == hashlib.sha256(b"from a file").hexdigest()
        assert registry.fetch_artifact("positivity@1").read_bytes() == b"from a file"

    def test_resolve_every_spec_form(self, registry: Registry) -> None:
        register(registry, "positivity", b"one")
        register(registry, "positivity", b"two")
        registry.set_alias("positivity", "production", 1)
        assert registry.resolve("positivity").version == 2
        assert registry.resolve("positivity@latest").version == 2
        assert registry.resolve("positivity@1").version == 1
        assert registry.resolve("positivity@production").version == 1
        assert registry.resolve(" Positivity@PRODUCTION ").version == 1

    def test_latest_skips_archived_and_failed_versions(self, registry: Registry) -> None:
        register(registry, "positivity", b"one")
        register(registry, "positivity", b"two", status="failed")
        assert registry.resolve("positivity").version == 1
        with pytest.raises(RegistryError, match="positivity@2 is failed"):
            registry.resolve("positivity@2")
        archived = registry.archive("positivity@1")
        assert archived.status == "archived"
        with pytest.raises(NotFoundError, match=r"no ready version; versions: 1 \(archived\), 2 \(failed\)"):
            registry.resolve("positivity")
        assert registry.resolve("positivity@1").status == "archived"
        assert [info.version for info in registry.list_versions("positivity", include_archived=False)] == [2]

    def test_unknown_names_list_what_exists(self, registry: Registry) -> None:
        register(registry, "positivity", b"one")
        register(registry, "conciseness", b"two")
        registry.set_alias("positivity", "staging", 1)
        with pytest.raises(NotFoundError, match="unknown objective 'humor'; registered: conciseness, positivity"):
            registry.resolve("humor")
        with pytest.raises(NotFoundError, match=r"no version 7; versions: 1 \(ready\)"):
            registry.resolve("positivity@7")
        with pytest.raises(NotFoundError, match="no alias 'production'; aliases: staging -> 1"):
            registry.resolve("positivity@production")
        with pytest.raises(SpecError, match="accepted forms"):
            registry.resolve("positivity@@1")

    def test_aliases_set_move_delete(self, registry: Registry) -> None:
        register(registry, "positivity", b"one")
        register(registry, "positivity", b"two")
        register(registry, "positivity", b"three", status="failed")
        assert registry.set_alias("positivity", "production", 1).version == 1
        assert registry.set_alias("positivity", "production", 2).version == 2
        registry.set_alias("positivity", "canary", 1)
        assert registry.list_aliases("positivity") == {"canary": 1, "production": 2}
        assert registry.show("positivity@2").aliases == ("production",)
        registry.delete_alias("positivity", "production")
        assert registry.list_aliases("positivity") == {"canary": 1}
        with pytest.raises(NotFoundError, match="aliases: canary"):
            registry.delete_alias("positivity", "production")
        with pytest.raises(SpecError):
            registry.set_alias("positivity", "12", 1)
        with pytest.raises(SpecError):
            registry.set_alias("positivity", "latest", 1)
        with pytest.raises(RegistryError, match="positivity@3 is failed"):
            registry.set_alias("positivity", "production", 3)
        with pytest.raises(NotFoundError, match="no version 9"):
            registry.set_alias("positivity", "production", 9)

    def test_lineage_parents_and_children(self, registry: Registry) -> None:
        root = register(registry, "positivity", b"iteration-0")
        child = register(registry, "positivity", b"iteration-1", iteration=1, parents=[root.id])
        grandchild = register(registry, "positivity", b"iteration-2", iteration=2, parents=[child.id, root.id])
        assert child.parents == (root.id,)
        assert grandchild.parents == tuple(sorted((root.id, child.id)))
        detail = registry.show("positivity@1")
        assert [info.version for info in detail.children] == [2, 3]
        assert detail.parents == ()
        assert [info.version for info in registry.show("positivity@3").parents] == [1, 2]

    def test_failed_registration_leaves_no_row_and_no_artifact(self, registry: Registry) -> None:
        registry.ensure_objective("positivity")
        with pytest.raises(NotFoundError, match=r"parent version ids \[999\]"):
            register(registry, "positivity", b"orphan?", parents=[999])
        assert registry.list_versions("positivity") == []
        assert not registry.store.exists(key_of(b"orphan?"))
        assert register(registry, "positivity", b"next").version == 1  # the counter rolled back too

    def test_failed_registration_keeps_an_artifact_other_versions_use(self, registry: Registry) -> None:
        kept = register(registry, "positivity", b"shared bytes")
        with pytest.raises(NotFoundError):
            register(registry, "conciseness", b"shared bytes", parents=[999])
        assert registry.fetch_artifact(kept).read_bytes() == b"shared bytes"

    def test_bad_metadata_is_refused_before_anything_is_written(self, registry: Registry) -> None:
        with pytest.raises(ConfigurationError, match="metrics must be JSON"):
            register(registry, "positivity", b"nan metrics", metrics={"val_mse": float("nan")})
        with pytest.raises(ConfigurationError, match="iteration"):
            register(registry, "positivity", b"bad iteration", iteration=-1)
        with pytest.raises(ConfigurationError, match="status"):
            register(registry, "positivity", b"bad status", status="done")
        assert not registry.store.exists(key_of(b"nan metrics"))

    def test_training_job_registers_once(self, registry: Registry) -> None:
        first = register(registry, "positivity", b"attempt 1", training_job_id="job-7")
        again = register(registry, "positivity", b"attempt 2", training_job_id="job-7")
        assert again == first
        assert len(registry.list_versions("positivity")) == 1
        assert not registry.store.exists(key_of(b"attempt 2"))
        with pytest.raises(RegistryError, match="already registered positivity@1"):
            register(registry, "conciseness", b"attempt 3", training_job_id="job-7")

    def test_tampered_artifact_is_refused(self, registry: Registry) -> None:
        info = register(registry, "positivity", b"0123456789")
        path = registry.fetch_artifact(info)
        data = bytearray(path.read_bytes())
        data[3] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="tampered"):
            registry.fetch_artifact(info)
        path.unlink()
        with pytest.raises(ArtifactError, match="missing"):
            registry.fetch_artifact(info)

    def test_a_head_for_another_tokenizer_is_refused(self, registry: Registry) -> None:
        info = register(registry, "positivity", b"head")
        info.check_compatible("f" * 64, "smollm2-135m-instruct")
        with pytest.raises(IncompatibleHeadError, match="positivity@1 was trained against tokenizer ffff"):
            info.check_compatible("e" * 64)
        with pytest.raises(IncompatibleHeadError, match="not 'other-model'"):
            info.check_compatible("f" * 64, "other-model")

    def test_objectives(self, registry: Registry) -> None:
        registry.ensure_objective("positivity", "VADER compound score", (-1.0, 1.0))
        register(registry, "positivity", b"one")
        register(registry, "positivity", b"two")
        registry.set_alias("positivity", "production", 1)
        registry.ensure_objective("conciseness")
        [conciseness, positivity] = registry.list_objectives()
        assert conciseness.name == "conciseness" and conciseness.version_count == 0
        assert conciseness.latest_ready_version is None
        assert positivity.description == "VADER compound score"
        assert positivity.reward_range == (-1.0, 1.0)
        assert (positivity.version_count, positivity.latest_ready_version) == (2, 2)
        assert positivity.aliases == {"production": 1}
        with pytest.raises(ConfigurationError, match="low <= high"):
            registry.ensure_objective("positivity", reward_range=(1.0, 0.0))
        with pytest.raises(SpecError):
            registry.ensure_objective("Not Valid!")

    def test_presets(self, registry: Registry) -> None:
        register(registry, "positivity", b"one")
        register(registry, "conciseness", b"two")
        preset = registry.create_preset("friendly", {"positivity": 0.7, "conciseness": 0.3}, ["positivity@1"])
        assert preset.weights == {"positivity": 0.7, "conciseness": 0.3}
        assert preset.pinned_specs == ("positivity@1",)
        assert registry.get_preset("FRIENDLY") == preset
        with pytest.raises(RegistryError, match="exists"):
            registry.create_preset("friendly", {"positivity": 1.0})
        replaced = registry.create_preset("friendly", {"positivity": 1.0}, replace=True)
        assert replaced.weights == {"positivity": 1.0} and replaced.pinned_specs == ()
        registry.create_preset("brief", {"conciseness": 1})
        assert [p.name for p in registry.list_presets()] == ["brief", "friendly"]
        with pytest.raises(UnknownObjectiveError, match="allowed: conciseness, positivity"):
            registry.create_preset("bad", {"humor": 1.0})
        with pytest.raises(InvalidWeightError):
            registry.create_preset("bad", {"positivity": -0.5})
        with pytest.raises(ConfigurationError, match="which the weights do not"):
            registry.create_preset("bad", {"positivity": 1.0}, ["conciseness@1"])
        with pytest.raises(NotFoundError, match="no version 5"):
            registry.create_preset("bad", {"positivity": 1.0}, ["positivity@5"])
        registry.delete_preset("brief")
        with pytest.raises(NotFoundError, match="presets: friendly"):
            registry.get_preset("brief")
        with pytest.raises(NotFoundError):
            registry.delete_preset("brief")

    def test_job_lifecycle(self, registry: Registry) -> None:
        job_id = registry.create_job("positivity", {"iterations": 2})
        job = registry.get_job(job_id)
        assert (job.status, job.attempt, job.config, job.progress) == ("queued", 0, {"iterations": 2}, {})
        assert registry.claim_job(job_id, "worker-a") is True
        assert registry.claim_job(job_id, "worker-b") is False
        job = registry.get_job(job_id)
        assert (job.status, job.worker, job.attempt) == ("running", "worker-a", 1)
        assert job.started_at is not None and job.heartbeat_at is not None
        assert registry.update_progress(job_id, {"iteration": 1, "loss": 0.5}) is False
        assert registry.get_job(job_id).progress == {"iteration": 1, "loss": 0.5}
        assert registry.request_cancel(job_id).cancel_requested is True
        assert registry.update_progress(job_id, {"iteration": 2}) is True
        finished = registry.finish_job(job_id, "cancelled", error="cancelled by user")
        assert (finished.status, finished.error) == ("cancelled", "cancelled by user")
        assert finished.finished_at is not None
        with pytest.raises(JobError, match="already finished as cancelled"):
            registry.finish_job(job_id, "succeeded")
        with pytest.raises(JobError, match="only a running job"):
            registry.update_progress(job_id, {})

    def test_job_success_records_the_version(self, registry: Registry) -> None:
        job_id = registry.create_job("positivity", {})
        assert registry.claim_job(job_id, "worker-a")
        info = register(registry, "positivity", b"trained", training_job_id=job_id)
        job = registry.finish_job(job_id, "succeeded", result_version_id=info.id)
        assert (job.status, job.result_version_id, job.error) == ("succeeded", info.id, None)
        with pytest.raises(JobError, match="finishes as"):
            registry.finish_job(job_id, "running")

    def test_cancelling_a_queued_job_stops_it_before_a_claim(self, registry: Registry) -> None:
        job_id = registry.create_job("positivity", {})
        assert registry.request_cancel(job_id).status == "cancelled"
        assert registry.claim_job(job_id, "worker-a") is False
        other = registry.create_job("conciseness", {})
        assert [job.id for job in registry.list_jobs(status="cancelled")] == [job_id]
        assert [job.id for job in registry.list_jobs(objective="conciseness")] == [other]
        with pytest.raises(NotFoundError, match="no training job 'nope'"):
            registry.claim_job("nope", "worker-a")
        with pytest.raises(NotFoundError):
            registry.get_job("nope")


class TestRegistrySqlite(RegistryContract):
    @pytest.fixture
    def registry(self, tmp_path: Path) -> Iterator[Registry]:
        store = ArtifactStore(tmp_path / "artifacts", cache_dir=tmp_path / "cache")
        with Registry(f"sqlite:///{tmp_path / 'registry.db'}", store) as registry:
            yield registry


def test_registry_on_a_memory_store(tmp_path: Path, memory_root: str) -> None:
    store = ArtifactStore(memory_root, cache_dir=tmp_path / "cache")
    with Registry("sqlite://", store) as registry:
        info = register(registry, "positivity", b"remote bytes")
        path = registry.fetch_artifact("positivity")
        assert path.is_relative_to(tmp_path / "cache")
        assert path.read_bytes() == b"remote bytes"
        assert registry.resolve("positivity") == info


@pytest.fixture
def memory_root() -> Iterator[str]:
    import uuid

    import fsspec

    root = f"memory://registry-{uuid.uuid4().hex}"
    yield root
    filesystem = fsspec.filesystem("memory")
    if filesystem.exists(root):
        filesystem.rm(root, recursive=True)


def _register_two(url: str, artifacts: str, barrier: Any, results: Any, worker: int) -> None:
    with Registry(url, ArtifactStore(artifacts), auto_upgrade=False) as registry:
        barrier.wait()
        for n in range(2):
            info = register(registry, "positivity", f"worker {worker} head {n}".encode())
            results.put(info.version)


def test_concurrent_registrations_on_sqlite_get_distinct_versions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    Registry(url, ArtifactStore(tmp_path / "artifacts")).close()  # migrates
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    workers = [
        context.Process(target=_register_two, args=(url, str(tmp_path / "artifacts"), barrier, results, w))
        for w in range(4)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
    assert [process.exitcode for process in workers] == [0, 0, 0, 0]
    assert sorted(results.get(timeout=5) for _ in range(8)) == list(range(1, 9))
