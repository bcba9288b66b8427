"""The artifact store: content addressing, atomic writes, verified fetches, no escape from the root."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from mavis_lc.errors import ArtifactError
from mavis_lc.registry.store import ArtifactStore, check_key

CONTENT = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      value head"
DIGEST = hashlib.sha256(CONTENT).hexdigest()
KEY = f"sha256/{DIGEST[:2]}/{DIGEST}.safetensors"


@pytest.fixture
def local_store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts", cache_dir=tmp_path / "cache")


@pytest.fixture
def memory_store(tmp_path: Path) -> Iterator[ArtifactStore]:
    root = f"memory://store-{uuid.uuid4().hex}"
    yield ArtifactStore(root, cache_dir=tmp_path / "cache")
    filesystem = fsspec.filesystem("memory")
    if filesystem.exists(root):
        filesystem.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, local_store: ArtifactStore, memory_store: ArtifactStore) -> ArtifactStore:
    return local_store if request.param == "local" else memory_store


def test_put_is_content_addressed(store: ArtifactStore, tmp_path: Path) -> None:
    assert tuple(store.put(CONTENT)) == (KEY, DIGEST, len(CONTENT))
    source = tmp_path / "head.safetensors"
    source.write_bytes(CONTENT)
    assert store.put_new(source) == ((KEY, DIGEST, len(CONTENT)), False)  # already there
    assert store.fetch(KEY, DIGEST).read_bytes() == CONTENT


def test_local_layout_and_no_leftover_temp_files(local_store: ArtifactStore, tmp_path: Path) -> None:
    local_store.put(CONTENT)
    files = sorted(p.relative_to(tmp_path / "artifacts").as_posix() for p in (tmp_path / "artifacts").rglob("*"))
    assert files == ["sha256", f"sha256/{DIGEST[:2]}", KEY]


def test_local_fetch_detects_one_flipped_byte(local_store: ArtifactStore) -> None:
    path = local_store.fetch(local_store.put(CONTENT).uri, DIGEST)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tampered"):
        local_store.fetch(KEY, DIGEST)
    assert local_store.put_new(CONTENT)[1] is True  # a corrupt copy is replaced, not trusted
    assert local_store.fetch(KEY, DIGEST).read_bytes() == CONTENT


def test_remote_fetch_detects_tampering_in_the_store_and_in_the_cache(memory_store: ArtifactStore) -> None:
    memory_store.put(CONTENT)
    cached = memory_store.fetch(KEY, DIGEST)
    cached.write_bytes(b"tampered cache")
    assert memory_store.fetch(KEY, DIGEST).read_bytes() == CONTENT  # re-fetched from the store
    remote = f"{memory_store.root_url}/{KEY}"
    fsspec.filesystem("memory").pipe_file(remote.removeprefix("memory://"), CONTENT[:-1] + b"!")
    cached.unlink()
    with pytest.raises(ArtifactError, match="tampered"):
        memory_store.fetch(KEY, DIGEST)
    assert not cached.exists()


def test_missing_artifact(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="missing"):
        store.fetch(KEY, DIGEST)
    with pytest.raises(ArtifactError, match="does not exist"):
        store.put(tmp_path / "nope.safetensors")


def test_delete_is_idempotent(store: ArtifactStore) -> None:
    store.put(CONTENT)
    assert store.exists(KEY)
    store.delete(KEY)
    store.delete(KEY)
    assert not store.exists(KEY)


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        f"sha256/{DIGEST[:2]}/../../../{DIGEST}.safetensors",
        f"/sha256/{DIGEST[:2]}/{DIGEST}.safetensors",
        f"C:/sha256/{DIGEST[:2]}/{DIGEST}.safetensors",
        f"file:///sha256/{DIGEST[:2]}/{DIGEST}.safetensors",
        f"sha256\\{DIGEST[:2]}\\{DIGEST}.safetensors",
        f"sha256/00/{DIGEST}.safetensors",
        f"sha256/{DIGEST[:2]}/{DIGEST}.pt",
        "",
    ],
)
def test_keys_that_could_escape_or_are_not_content_addressed_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(ArtifactError):
        store.fetch(key, DIGEST)
    with pytest.raises(ArtifactError):
        store.delete(key)


def test_key_must_belong_to_the_sha256() -> None:
    other = "0" * 64
    with pytest.raises(ArtifactError, match="does not belong"):
        check_key(KEY, other)
    assert check_key(KEY, DIGEST) == KEY


def test_symlink_out_of_the_root_is_refused(local_store: ArtifactStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{DIGEST}.safetensors").write_bytes(CONTENT)
    (tmp_path / "artifacts" / "sha256").mkdir(parents=True)
    os.symlink(outside, tmp_path / "artifacts" / "sha256" / DIGEST[:2])
    with pytest.raises(ArtifactError, match="outside the store root"):
        local_store.fetch(KEY, DIGEST)
    with pytest.raises(ArtifactError, match="outside the store root"):
        local_store.put(CONTENT)


def test_file_url_root_is_local(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    assert store.is_local
    store.put(CONTENT)
    assert (tmp_path / "artifacts" / KEY).read_bytes() == CONTENT


def test_default_root_comes_from_settings(mavis_home: Path) -> None:
    store = ArtifactStore()
    store.put(CONTENT)
    assert (mavis_home / "artifacts" / KEY).is_file()
