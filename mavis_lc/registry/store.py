"""Content-addressed artifact store for value-head files.

An artifact is one ``.safetensors`` file, stored under a key derived from its sha256
(``sha256/ab/abcdef....safetensors``) below a root that is a local folder (the default,
``MAVIS_ARTIFACTS``) or any fsspec URL (``s3://bucket/mavis``, ``memory://x`` in tests).

- Writes are atomic: a temporary file in the destination folder, fsync, rename (for remote
  stores: write a temporary key, then move it into place). Readers never see half a file.
- Every fetch re-hashes the bytes and refuses a mismatch with ``ArtifactError``. Remote
  artifacts are copied into a local cache, which is verified the same way on every fetch.
- Keys are checked before any file is touched: no absolute paths, no ``..``, nothing but the
  content-addressed form, and for local stores the resolved path (symlinks followed) must
  stay inside the root.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, NamedTuple

from fsspec.core import split_protocol, url_to_fs

from mavis_lc.errors import ArtifactError
from mavis_lc.settings import get_settings

CHUNK_BYTES = 1 << 20
ARTIFACT_SUFFIX = ".safetensors"
_KEY_PATTERN = re.compile(r"sha256/([0-9a-f]{2})/([0-9a-f]{64})\.safetensors")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

ArtifactSource = str | os.PathLike[str] | bytes
"""What ``put`` accepts: a local file path, or the file's bytes."""


class StoredArtifact(NamedTuple):
    """Where an artifact lives in the store (``uri`` is a key relative to the root) and what it is."""

    uri: str
    sha256: str
    size_bytes: int


def key_for(sha256: str) -> str:
    """The store key of the artifact whose hex sha256 is ``sha256``."""
    return f"sha256/{sha256[:2]}/{sha256}{ARTIFACT_SUFFIX}"


def check_key(uri: str, sha256: str | None = None) -> str:
    """Return ``uri`` if it is a content-addressed key (matching ``sha256`` when given).

    Raises:
        ArtifactError: the key is absolute, contains ``..``, or is not of the form
            ``sha256/ab/<64 hex>.safetensors``.
    """
    if not isinstance(uri, str) or not uri:
        raise ArtifactError(f"artifact key must be a non-empty string, got {uri!r}")
    parts = PurePosixPath(uri.replace("\\", "/")).parts
    if uri.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", uri) or "://" in uri:
        raise ArtifactError(f"artifact key {uri!r} is absolute; keys are relative to the store root")
    if ".." in parts or "\\" in uri:
        raise ArtifactError(f"artifact key {uri!r} would leave the store root")
    match = _KEY_PATTERN.fullmatch(uri)
    if match is None or match.group(2)[:2] != match.group(1):
        raise ArtifactError(f"artifact key {uri!r} is not of the form sha256/ab/<64 hex>{ARTIFACT_SUFFIX}")
    if sha256 is not None and match.group(2) != sha256:
        raise ArtifactError(f"artifact key {uri!r} does not belong to sha256 {sha256}")
    return uri


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def sha256_of_file(path: Path) -> tuple[str, int]:
    """The hex sha256 and size in bytes of a local file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        for chunk in _chunks(stream):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """A content-addressed store rooted at a local folder or an fsspec URL."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, cache_dir: Path | None = None) -> None:
        """``root`` defaults to ``MAVIS_ARTIFACTS``; ``cache_dir`` (remote stores only) to
        ``$MAVIS_HOME/cache/artifacts``. Nothing is created until the first write."""
        settings = get_settings()
        root_text = os.fspath(root) if root is not None else settings.resolved_artifacts()
        self.root_url = root_text
        protocol, _ = split_protocol(root_text)
        self.is_local = protocol in (None, "file", "local")
        self._fs: Any = None
        self._root_path: str = ""
        if self.is_local:
            local_text = root_text.split("://", 1)[1] if protocol else root_text
            self._local_root = Path(local_text).expanduser().absolute()
        else:
            try:
                self._fs, self._root_path = url_to_fs(root_text)
            except ImportError as exc:  # fsspec names the package it needs (s3fs, gcsfs, ...)
                from mavis_lc.extras import MissingExtraError

                hint = " (the 's3' extra installs it: pip install 'mavis-lc[s3]')" if protocol in ("s3", "s3a") else ""
                raise MissingExtraError(f"artifact store {root_text!r}: {exc}{hint}") from exc
            self._local_root = Path()
        self.cache_dir = cache_dir if cache_dir is not None else settings.resolved_cache_dir() / "artifacts"

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_url!r})"

    def put(self, source: ArtifactSource) -> StoredArtifact:
        """Store a file (path) or bytes; return its key, sha256 and size. Storing the same
        content twice is a no-op that returns the same key.

        Raises:
            ArtifactError: the source file is missing, or changed while it was being stored.
        """
        return self.put_new(source)[0]

    def put_new(self, source: ArtifactSource) -> tuple[StoredArtifact, bool]:
        """Like ``put``, and also say whether this call created the file (``False``: it was there)."""
        if isinstance(source, bytes):
            digest, size = hashlib.sha256(source).hexdigest(), len(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ArtifactError(f"artifact file {str(path)!r} does not exist")
            digest, size = sha256_of_file(path)
        stored = StoredArtifact(key_for(digest), digest, size)
        if self._verified(stored.uri, digest):
            return stored, False
        if self.is_local:
            self._write_local(stored, source)
        else:
            self._write_remote(stored, source)
        return stored, True

    def fetch(self, uri: str, sha256: str) -> Path:
        """A local path to the artifact ``uri``, whose bytes were just verified against ``sha256``.

        Raises:
            ArtifactError: the key is invalid or escapes the root, the artifact is missing,
                or its bytes do not match ``sha256`` (tampered or truncated).
        """
        if not isinstance(sha256, str) or not _SHA256_PATTERN.fullmatch(sha256):
            raise ArtifactError(f"expected a lower-case hex sha256, got {sha256!r}")
        check_key(uri, sha256)
        if self.is_local:
            path = self._local_path(uri)
            if not path.is_file():
                raise ArtifactError(f"artifact {uri!r} is missing from store {self.root_url!r}")
            self._verify_local(path, sha256, uri)
            return path
        return self._fetch_remote(uri, sha256)

    def exists(self, uri: str) -> bool:
        """Whether a file exists under the key ``uri`` (its content is not checked)."""
        check_key(uri)
        if self.is_local:
            return self._local_path(uri).is_file()
        return bool(self._fs.exists(self._remote_path(uri)))

    def delete(self, uri: str) -> None:
        """Remove the artifact ``uri`` (and its local cached copy); a missing one is not an error."""
        check_key(uri)
        if self.is_local:
            self._local_path(uri).unlink(missing_ok=True)
            return
        remote = self._remote_path(uri)
        if self._fs.exists(remote):
            self._fs.rm(remote)
        (self.cache_dir / uri).unlink(missing_ok=True)

    def _local_path(self, uri: str) -> Path:
        root = self._local_root.resolve()
        path = (root / uri).resolve()
        if not path.is_relative_to(root):
            raise ArtifactError(f"artifact key {uri!r} resolves outside the store root {str(root)!r}")
        return path

    def _remote_path(self, uri: str) -> str:
        return f"{self._root_path.rstrip('/')}/{uri}"

    def _verified(self, uri: str, sha256: str) -> bool:
        """Whether ``uri`` already holds exactly the bytes of ``sha256``."""
        if self.is_local:
            path = self._local_path(uri)
            return path.is_file() and sha256_of_file(path)[0] == sha256
        remote = self._remote_path(uri)
        if not self._fs.exists(remote):
            return False
        digest = hashlib.sha256()
        with self._fs.open(remote, "rb") as stream:
            for chunk in _chunks(stream):
                digest.update(chunk)
        return digest.hexdigest() == sha256

    @staticmethod
    def _verify_local(path: Path, sha256: str, uri: str) -> None:
        actual, _ = sha256_of_file(path)
        if actual != sha256:
            raise ArtifactError(f"artifact {uri!r} is corrupt or was tampered with: sha256 {actual}, expected {sha256}")

    def _write_local(self, stored: StoredArtifact, source: ArtifactSource) -> None:
        final = self._local_path(stored.uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        final = self._local_path(stored.uri)  # re-check: the folders may be symlinks
        fd, temp_name = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=".part")
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                else:
                    with Path(source).open("rb") as stream:
                        for chunk in _chunks(stream):
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if sha256_of_file(temp)[0] != stored.sha256:
                raise ArtifactError(f"artifact source {source!r:.80} changed while it was being stored")
            os.replace(temp, final)
            _fsync_dir(final.parent)
        finally:
            temp.unlink(missing_ok=True)

    def _write_remote(self, stored: StoredArtifact, source: ArtifactSource) -> None:
        final = self._remote_path(stored.uri)
        temp = f"{final.rsplit('/', 1)[0]}/.tmp-{uuid.uuid4().hex}.part"
        self._fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        try:
            if isinstance(source, bytes):
                self._fs.pipe_file(temp, source)
            else:
                self._fs.put_file(os.fspath(source), temp)
            self._fs.mv(temp, final)
        finally:
            if self._fs.exists(temp):
                self._fs.rm(temp)

    def _fetch_remote(self, uri: str, sha256: str) -> Path:
        cached = self.cache_dir / uri
        if cached.is_file() and sha256_of_file(cached)[0] == sha256:
            return cached
        remote = self._remote_path(uri)
        if not self._fs.exists(remote):
            raise ArtifactError(f"artifact {uri!r} is missing from store {self.root_url!r}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=cached.parent, prefix=".tmp-", suffix=".part")
        temp = Path(temp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self._fs.open(remote, "rb") as stream:
                for chunk in _chunks(stream):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256:
                raise ArtifactError(
                    f"artifact {uri!r} in {self.root_url!r} is corrupt or was tampered with: "
                    f"sha256 {digest.hexdigest()}, expected {sha256}"
                )
            os.replace(temp, cached)
        finally:
            temp.unlink(missing_ok=True)
        return cached
