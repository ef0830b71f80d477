"""Authenticated encryption of one personal value, and the wrapping of data keys by a master key.

A sealed value is `pii1.<key id>.<base64url(nonce | ciphertext | tag)>`, AES-256-GCM-SIV under the
customer's data key, with the context (event id and field) as associated data, so a token cannot be
moved to another event or field. The nonce is derived from the data key and the context: sealing the
same value for the same event twice gives the same token, so a resent event keeps its fingerprint
(the worker's de-duplication compares content). GCM-SIV stays safe when a nonce repeats; it reveals
only that two plaintexts under one key and context are equal."""

from __future__ import annotations

import base64
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV

from schemas.envelope import SEALED_PREFIX

KEY_BYTES = 32
NONCE_BYTES = 12


class SealError(ValueError):
    """A token that is not a sealed value, was forged or altered, or whose key is not at hand."""


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def new_key_id() -> str:
    return os.urandom(16).hex()


def seal(data_key: bytes, key_id: str, context: str, plaintext: bytes, cipher: AESGCMSIV | None = None) -> str:
    """`cipher`, AESGCMSIV(data_key) made once by a caller that seals several values under one key."""
    aad = context.encode()
    nonce = hmac.digest(data_key, b"nonce|" + aad, "sha256")[:NONCE_BYTES]
    sealed = nonce + (cipher or AESGCMSIV(data_key)).encrypt(nonce, plaintext, aad)
    return f"{SEALED_PREFIX}{key_id}.{_b64(sealed)}"


def token_key_id(token: str) -> str:
    """The id of the data key a token was sealed under; SealError if it is not a token."""
    prefix, _, rest = token.partition(".")
    key_id, _, body = rest.partition(".")
    if f"{prefix}." != SEALED_PREFIX or len(key_id) != 32 or not body:
        raise SealError("not a sealed value")
    return key_id


def unseal(data_key: bytes, token: str, context: str) -> bytes:
    token_key_id(token)
    try:
        sealed = _unb64(token.rsplit(".", 1)[1])
        return AESGCMSIV(data_key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
    except (InvalidTag, ValueError) as exc:
        raise SealError("the sealed value does not open under its key and context (altered or forged)") from exc


def wrap(master_key: bytes, data_key: bytes, context: str) -> str:
    """A data key encrypted under a master key (AES-256-GCM, random nonce), bound to its context."""
    return KeyMaker(master_key).wrap(data_key, context, os.urandom(NONCE_BYTES))


class KeyMaker:
    """Makes many data keys under one master key: their ids, keys and wrapping nonces from one read
    of the system's randomness. A read per value costs a system call that hands the GIL to the
    producer's thread and waits to get it back: in a bulk edge (`crm import`) that was a third of
    the time spent making keys."""

    def __init__(self, master_key: bytes):
        self.cipher = AESGCM(master_key)

    def new_keys(self, count: int) -> list[tuple[str, bytes, bytes]]:
        """`count` fresh (key id, data key, nonce to wrap it with)."""
        size = 16 + KEY_BYTES + NONCE_BYTES
        raw = os.urandom(count * size)
        return [(raw[at:at + 16].hex(), raw[at + 16:at + 16 + KEY_BYTES], raw[at + 16 + KEY_BYTES:at + size])
                for at in range(0, count * size, size)]

    def wrap(self, data_key: bytes, context: str, nonce: bytes) -> str:
        """As `wrap`, with a nonce of `new_keys` (never one used before)."""
        return _b64(nonce + self.cipher.encrypt(nonce, data_key, context.encode()))


def unwrap(master_key: bytes, wrapped: str, context: str) -> bytes:
    try:
        raw = _unb64(wrapped)
        return AESGCM(master_key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
    except (InvalidTag, ValueError) as exc:
        raise SealError("the wrapped data key does not open under the master key") from exc


def keyed_hash(secret: bytes, value: str) -> str:
    """HMAC-SHA256 of a normalised identifier (phone, e-mail): links identities without being
    reversible by anyone who lacks the secret, unlike a plain hash and a dictionary."""
    return hmac.digest(secret, value.encode(), "sha256").hex()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
