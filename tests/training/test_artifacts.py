"""The encrypted artifact store on its own: envelope encryption, chunks, tampering, keys."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest

from falaj_platform.runtime.errors import FailedPrecondition, StartupError
from falaj_platform.services.training.artifacts import HEADER, TAG_BYTES, ArtifactStore, KeyEncryptionKey, Keyring, load_or_create_kek
from falaj_platform.services.training.errors import ArtifactIntegrityError

CHUNK = 1024


@pytest.fixture
def kek(tmp_path: Path) -> KeyEncryptionKey:
    return load_or_create_kek(tmp_path / "keys" / "kek.key")


@pytest.fixture
def store(tmp_path: Path, kek: KeyEncryptionKey) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts", Keyring(kek), chunk_size=CHUNK)


def plaintext(size: int) -> bytes:
    return secrets.token_bytes(size // 2) + b"ONNX-MARKER" * (size // 22)


def test_the_kek_file_is_created_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "kek.key"
    first = load_or_create_kek(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_kek(path) == first and first.key_id.startswith("kek-")
    assert first.key_id not in path.read_text()  # the id is a fingerprint, not the key
    os.chmod(path, 0o644)
    with pytest.raises(StartupError, match="chmod 600"):
        load_or_create_kek(path)


def test_an_artifact_round_trips_in_chunks_and_is_not_stored_in_plaintext(store: ArtifactStore) -> None:
    content = plaintext(5 * CHUNK + 17)
    stored = store.write("model", (content[i : i + 300] for i in range(0, len(content), 300)))
    assert (stored.size_bytes, stored.chunk_count, stored.chunk_size_bytes) == (len(content), 6, CHUNK)
    on_disk = (store.root / stored.path).read_bytes()
    assert len(on_disk) == HEADER.size + len(content) + 6 * TAG_BYTES
    assert b"ONNX-MARKER" not in on_disk and content[:64] not in on_disk
    assert store.read_all(stored) == content
    assert b"".join(piece for _, piece in store.read(stored, start_offset=2 * CHUNK + 5)) == content[2 * CHUNK + 5 :]
    other = store.write("model", [content])
    assert other.wrapped_data_key != stored.wrapped_data_key  # a fresh data key per artifact
    assert (store.root / other.path).read_bytes()[HEADER.size :] != on_disk[HEADER.size :]


def test_an_empty_artifact_is_one_sealed_chunk(store: ArtifactStore) -> None:
    stored = store.write("model", [])
    assert stored.chunk_count == 1 and store.read_all(stored) == b""


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap", "append"])
def test_any_change_to_the_file_is_caught(store: ArtifactStore, damage: str) -> None:
    content = plaintext(4 * CHUNK)
    stored = store.write("model", [content])
    path = store.root / stored.path
    data = bytearray(path.read_bytes())
    sealed = CHUNK + TAG_BYTES
    if damage == "flip":
        data[HEADER.size + sealed + 7] ^= 0x80
    elif damage == "truncate":
        del data[-sealed:]
    elif damage == "swap":
        first, second = HEADER.size, HEADER.size + sealed
        data[first:second], data[second : second + sealed] = data[second : second + sealed], data[first:second]
    else:
        data += b"\0" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError):
        store.verify(stored)


def test_a_wrong_digest_record_is_caught(store: ArtifactStore) -> None:
    from dataclasses import replace

    stored = store.write("model", [plaintext(3000)])
    with pytest.raises(ArtifactIntegrityError, match="SHA-256"):
        store.verify(replace(stored, sha256="0" * 64))


def test_a_wrong_or_missing_key_encryption_key_cannot_read(store: ArtifactStore, kek: KeyEncryptionKey, tmp_path: Path) -> None:
    stored = store.write("model", [plaintext(2000)])
    impostor = KeyEncryptionKey(kek.key_id, secrets.token_bytes(32))  # same id, other key (a swapped key file)
    with pytest.raises(ArtifactIntegrityError, match="wrong key"):
        ArtifactStore(store.root, Keyring(impostor), CHUNK).read_all(stored)
    stranger = load_or_create_kek(tmp_path / "other" / "kek.key")
    with pytest.raises(FailedPrecondition, match=kek.key_id):
        ArtifactStore(store.root, Keyring(stranger), CHUNK).read_all(stored)
    rotated = ArtifactStore(store.root, Keyring(stranger, [kek]), CHUNK)  # rotation: the old key still reads
    assert rotated.read_all(stored) == store.read_all(stored)
    assert rotated.write("model", [b"new"]).key_id == stranger.key_id


def test_a_data_key_cannot_be_moved_to_another_artifact(store: ArtifactStore) -> None:
    from dataclasses import replace

    first = store.write("model", [plaintext(2000)])
    second = store.write("model", [plaintext(2000)])
    with pytest.raises(ArtifactIntegrityError):
        store.read_all(replace(second, wrapped_data_key=first.wrapped_data_key))
