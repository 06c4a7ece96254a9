"""Encrypted artifact store: AES-256-GCM envelope encryption, in chunks, digest-checked.

Each artifact gets a fresh 256-bit data key, wrapped (AES-256-GCM) by the service's
key-encryption key (KEK); only the wrapped key and the KEK's id are recorded. The
plaintext is cut into fixed-size chunks, each sealed with its own nonce (the chunk
index; unique because the key is used for this artifact only) and with associated data
binding it to the artifact, its position and whether it is the last one - so chunks
cannot be swapped, reordered, dropped or moved to another artifact unnoticed. Models
over 2 GiB never need to be in memory at once.

Every read checks each chunk's tag and the SHA-256 of the whole plaintext against the
digest recorded at registration; any difference raises `ArtifactIntegrityError`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from falaj_platform.runtime.errors import FailedPrecondition, StartupError
from falaj_platform.services.training.errors import ArtifactIntegrityError

ALGORITHM = "AES_256_GCM"
MAGIC = b"FALAJENC"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sHI")  # magic, format version, plaintext chunk size
TAG_BYTES = 16
KEY_BYTES = 32
NONCE_BYTES = 12


@dataclass(frozen=True)
class KeyEncryptionKey:
    """A key-encryption key and its public id (a fingerprint, not the key)."""

    key_id: str
    key: bytes

    @classmethod
    def from_bytes(cls, key: bytes) -> KeyEncryptionKey:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a key-encryption key is {KEY_BYTES} bytes, not {len(key)}")
        return cls("kek-" + hashlib.sha256(b"falaj-kek-id\0" + key).hexdigest()[:16], key)


def load_or_create_kek(path: Path) -> KeyEncryptionKey:
    """The KEK in `path` (base64 text), created with mode 0600 when the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first; read theirs
        else:
            with os.fdopen(fd, "w") as file:
                file.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
                file.flush()
                os.fsync(file.fileno())
    if path.stat().st_mode & 0o077:
        raise StartupError(f"key-encryption key file {path} must be readable by its owner only (chmod 600)")
    try:
        return KeyEncryptionKey.from_bytes(base64.b64decode(path.read_text().strip(), validate=True))
    except (ValueError, UnicodeDecodeError):
        raise StartupError(f"key-encryption key file {path} does not hold {KEY_BYTES} base64-encoded bytes") from None


class Keyring:
    """The current KEK (wraps new data keys) and older ones (still unwrap old artifacts)."""

    def __init__(self, current: KeyEncryptionKey, previous: Iterable[KeyEncryptionKey] = ()):
        self.current = current
        self._by_id = {key.key_id: key for key in (*previous, current)}

    def wrap(self, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return self.current.key_id, nonce + AESGCM(self.current.key).encrypt(nonce, data_key, b"falaj-data-key\0" + context)

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        kek = self._by_id.get(key_id)
        if kek is None:
            raise FailedPrecondition(
                f"the artifact's data key was wrapped by key-encryption key {key_id}, which this service does not hold",
                reason="KEK_NOT_AVAILABLE",
                metadata={"key_id": key_id},
            )
        try:
            return AESGCM(kek.key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], b"falaj-data-key\0" + context)
        except InvalidTag:
            raise ArtifactIntegrityError(
                f"the artifact's data key does not unwrap with key-encryption key {key_id}: wrong key or tampered record",
                reason="ARTIFACT_KEY_MISMATCH",
            ) from None


@dataclass(frozen=True)
class StoredArtifact:
    """Where an artifact is and how to read it back; what the registry records."""

    path: str  # relative to the store root
    size_bytes: int
    sha256: str
    key_id: str
    wrapped_data_key: bytes
    chunk_size_bytes: int
    chunk_count: int
    algorithm: str = ALGORITHM

    @property
    def artifact_id(self) -> str:
        return Path(self.path).stem


def _chunk_context(header: bytes, artifact_id: str, index: int, last: bool) -> bytes:
    return header + artifact_id.encode() + struct.pack(">Q?", index, last)


def _nonce(index: int) -> bytes:
    return b"\0\0\0\0" + struct.pack(">Q", index)


def _rechunk(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    yield bytes(buffer)  # the last chunk, possibly empty (an empty artifact is one empty chunk)


class ArtifactStore:
    """Encrypted artifact files under `root`, one per registered version."""

    def __init__(self, root: Path, keyring: Keyring, chunk_size: int = 4 * 1024 * 1024):
        self.root = root
        self.keyring = keyring
        self.chunk_size = chunk_size

    def write(self, folder: str, pieces: Iterable[bytes]) -> StoredArtifact:
        """Encrypt `pieces` (the plaintext, in any cut) into a new file; nothing is left on failure."""
        artifact_id = secrets.token_hex(16)
        relative = f"{folder}/{artifact_id}.enc"
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        data_key = secrets.token_bytes(KEY_BYTES)
        key_id, wrapped = self.keyring.wrap(data_key, artifact_id.encode())
        cipher = AESGCM(data_key)
        header = HEADER.pack(MAGIC, FORMAT_VERSION, self.chunk_size)
        digest = hashlib.sha256()
        size = count = 0
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(header)
                chunks = _rechunk(pieces, self.chunk_size)
                current = next(chunks)
                for following in chunks:
                    file.write(cipher.encrypt(_nonce(count), current, _chunk_context(header, artifact_id, count, False)))
                    digest.update(current)
                    size, count, current = size + len(current), count + 1, following
                file.write(cipher.encrypt(_nonce(count), current, _chunk_context(header, artifact_id, count, True)))
                digest.update(current)
                size, count = size + len(current), count + 1
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return StoredArtifact(relative, size, digest.hexdigest(), key_id, wrapped, self.chunk_size, count)

    def chunks(self, artifact: StoredArtifact, start_chunk: int = 0) -> Iterator[bytes]:
        """Plaintext chunks from `start_chunk` on, each tag-checked; the caller checks the digest."""
        data_key = self.keyring.unwrap(artifact.key_id, artifact.wrapped_data_key, artifact.artifact_id.encode())
        cipher = AESGCM(data_key)
        path = self.root / artifact.path
        sealed = artifact.chunk_size_bytes + TAG_BYTES
        expected_length = HEADER.size + artifact.size_bytes + TAG_BYTES * artifact.chunk_count
        try:
            file = path.open("rb")
        except FileNotFoundError:
            raise ArtifactIntegrityError(f"the artifact file {artifact.path} is missing", reason="ARTIFACT_MISSING") from None
        with file:
            header = file.read(HEADER.size)
            if len(header) != HEADER.size or HEADER.unpack(header) != (MAGIC, FORMAT_VERSION, artifact.chunk_size_bytes):
                raise ArtifactIntegrityError(f"the artifact file {artifact.path} has a damaged header")
            if os.fstat(file.fileno()).st_size != expected_length:
                raise ArtifactIntegrityError(f"the artifact file {artifact.path} is not the size that was registered")
            file.seek(HEADER.size + start_chunk * sealed)
            for index in range(start_chunk, artifact.chunk_count):
                block = file.read(sealed)
                last = index == artifact.chunk_count - 1
                try:
                    yield cipher.decrypt(_nonce(index), block, _chunk_context(header, artifact.artifact_id, index, last))
                except InvalidTag:
                    raise ArtifactIntegrityError(
                        f"chunk {index} of the artifact file {artifact.path} fails its authentication tag: the file was altered"
                    ) from None

    def read(self, artifact: StoredArtifact, start_offset: int = 0) -> Iterator[tuple[int, bytes]]:
        """(offset, plaintext) pieces from `start_offset`; a read from 0 also checks the digest at the end."""
        start_chunk = start_offset // artifact.chunk_size_bytes
        offset = start_chunk * artifact.chunk_size_bytes
        digest = hashlib.sha256() if start_chunk == 0 else None
        for chunk in self.chunks(artifact, start_chunk):
            if digest is not None:
                digest.update(chunk)
            skip = max(0, start_offset - offset)
            if skip < len(chunk):
                yield offset + skip, chunk[skip:]
            offset += len(chunk)
        if digest is not None and digest.hexdigest() != artifact.sha256:
            raise ArtifactIntegrityError(
                f"the SHA-256 of the artifact file {artifact.path} is {digest.hexdigest()}, not the registered {artifact.sha256}"
            )

    def verify(self, artifact: StoredArtifact) -> None:
        """Check every tag and the whole digest; raises ArtifactIntegrityError on any difference."""
        for _ in self.read(artifact):
            pass

    def read_all(self, artifact: StoredArtifact) -> bytes:
        """The verified plaintext (for artifacts that fit in memory, e.g. a baseline for the gate)."""
        return b"".join(piece for _, piece in self.read(artifact))

    def delete(self, artifact_path: str) -> None:
        (self.root / artifact_path).unlink(missing_ok=True)
