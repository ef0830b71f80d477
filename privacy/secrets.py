"""The platform's two secrets, from configuration:

- the master keyring, which wraps every customer's data key: `CRM_MASTER_KEYS` as
  `id:base64key,id:base64key,...`, the first wrapping new keys and every one unwrapping (rotation:
  docs/privacy.md);
- the identity secret, the HMAC key of phone and e-mail aliases: `CRM_IDENTITY_SECRET` (base64).
  It must be the same everywhere and never change, or identity links break.

Unset, the single-machine stack makes each once under `$CRM_STATE_DIR/secrets/` (mode 0600). A
cluster gives them from its secret manager; backups never include them (docs/privacy.md)."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from privacy.seal import KEY_BYTES, new_key


@dataclass(frozen=True)
class MasterKeyring:
    keys: tuple[tuple[str, bytes], ...]  # (id, key); the first is current

    @property
    def current(self) -> tuple[str, bytes]:
        return self.keys[0]

    def get(self, key_id: str) -> bytes | None:
        return dict(self.keys).get(key_id)

    @classmethod
    def parse(cls, text: str) -> MasterKeyring:
        keys = []
        for entry in text.replace("\n", ",").split(","):
            if not entry.strip():
                continue
            key_id, sep, encoded = entry.strip().partition(":")
            key = base64.b64decode(encoded) if sep else b""
            if not key_id or len(key) != KEY_BYTES:
                raise ValueError(f"a master key is `id:base64 of {KEY_BYTES} bytes`, not {entry.strip()[:12]!r}…")
            keys.append((key_id, key))
        if not keys:
            raise ValueError("no master key configured")
        return cls(tuple(keys))

    def render(self) -> str:
        return "\n".join(f"{key_id}:{base64.b64encode(key).decode()}" for key_id, key in self.keys) + "\n"


def secrets_dir(state_dir: Path) -> Path:
    return state_dir / "secrets"


def master_keyring(state_dir: Path) -> MasterKeyring:
    configured = os.environ.get("CRM_MASTER_KEYS")
    if configured:
        return MasterKeyring.parse(configured)
    path = secrets_dir(state_dir) / "master-keys"
    if not path.exists():
        _write_secret(path, MasterKeyring((("m1", new_key()),)).render())
    return MasterKeyring.parse(path.read_text())


def identity_secret(state_dir: Path) -> bytes:
    configured = os.environ.get("CRM_IDENTITY_SECRET")
    if configured:
        return base64.b64decode(configured)
    path = secrets_dir(state_dir) / "identity-secret"
    if not path.exists():
        _write_secret(path, base64.b64encode(new_key()).decode() + "\n")
    return base64.b64decode(path.read_text().strip())


def _write_secret(path: Path, text: str) -> None:
    """Created 0600 and atomically: two processes starting at once keep the first one's secret."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    try:
        os.link(temporary, path)  # fails if another process made it first; theirs stays
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
