"""Sealing personal values (privacy/seal.py, privacy/fields.py, privacy/secrets.py) and the catalog's
two forms of an event: as submitted (plain) and as it lies in the log (sealed)."""

from __future__ import annotations

import hashlib
import stat
import uuid

import orjson
import pytest

from privacy.fields import REDACTED, KeyUnavailable, key_ids, redact, seal_event, unseal_event, unsealed_fields
from privacy.seal import KeyMaker, SealError, keyed_hash, new_key, new_key_id, seal, unseal, unwrap, wrap
from privacy.secrets import MasterKeyring, identity_secret, master_keyring
from schemas.codec import DecodeError, decode_event, to_json_dict
from schemas.events import personal_payload_fields, submitted_model

KEY, KEY_ID = new_key(), new_key_id()


def registration(**payload) -> dict:
    body = {"event_id": str(uuid.uuid4()), "type": "customer_registered", "customer_id": "c-1",
            "occurred_at": "2026-03-01T10:00:00Z", "source": {"channel": "app"},
            "payload": {"name": "Ada Lovelace", "email": "ada@example.org", "birthday": "1815-12-10",
                        "address": {"line1": "12 St James's Square", "city": "London", "country": "GB"}, **payload}}
    return to_json_dict(submitted_model("customer_registered").model_validate(body))


def test_the_catalog_marks_the_contact_details_personal_and_nothing_else():
    assert personal_payload_fields("customer_registered") == ("name", "email", "phone", "birthday", "address")
    assert personal_payload_fields("profile_updated") == ("name", "email", "phone", "birthday", "address")
    assert personal_payload_fields("purchase_completed") == ()


def test_a_sealed_event_holds_no_plain_value_and_opens_to_what_was_sent():
    event = registration()
    sealed = seal_event(event, KEY_ID, KEY)
    raw = orjson.dumps(sealed)
    for plain in (b"Ada Lovelace", b"ada@example.org", b"1815-12-10", b"St James"):
        assert plain not in raw
    assert sealed["payload"]["birth_month"] == 12
    assert key_ids(sealed) == {KEY_ID}
    opened = unseal_event(sealed, {KEY_ID: KEY}.get)
    assert {k: v for k, v in opened["payload"].items() if k != "birth_month"} == event["payload"]


def test_sealing_is_deterministic_so_a_resent_event_keeps_its_fingerprint():
    event = registration()
    assert seal_event(event, KEY_ID, KEY) == seal_event(event, KEY_ID, KEY)
    assert seal_event(seal_event(event, KEY_ID, KEY), KEY_ID, KEY) == seal_event(event, KEY_ID, KEY)


def test_the_sealed_form_is_what_the_log_takes_and_the_plain_form_is_refused():
    event = registration()
    decoded = decode_event(orjson.dumps(seal_event(event, KEY_ID, KEY)))
    assert not isinstance(decoded, DecodeError), decoded
    refused = decode_event(orjson.dumps(event))
    assert isinstance(refused, DecodeError) and refused.reason == "personal_data_in_clear"
    assert "payload.email" in refused.detail and "ada@example.org" not in refused.detail
    assert unsealed_fields(event) == ["payload.name", "payload.email", "payload.birthday", "payload.address"]


def test_a_token_moved_to_another_event_or_field_does_not_open():
    sealed = seal_event(registration(), KEY_ID, KEY)
    token = sealed["payload"]["email"]
    with pytest.raises(SealError):
        unseal(KEY, token, f"{uuid.uuid4()}/payload.email")
    with pytest.raises(SealError):
        unseal(KEY, token, f"{sealed['event_id']}/payload.name")


def test_an_altered_or_forged_token_is_a_clear_error():
    sealed = seal_event(registration(), KEY_ID, KEY)
    token = sealed["payload"]["email"]
    altered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(SealError, match="altered or forged"):
        unseal_event({**sealed, "payload": {**sealed["payload"], "email": altered}}, {KEY_ID: KEY}.get)
    with pytest.raises(SealError, match="not a sealed value"):
        unseal(KEY, "pii1.nothex.abc", "x")


def test_a_token_whose_key_is_gone_says_so():
    sealed = seal_event(registration(), KEY_ID, KEY)
    with pytest.raises(KeyUnavailable, match=KEY_ID):
        unseal_event(sealed, lambda key_id: None)


def test_a_data_key_unwraps_only_under_its_master_key_and_context():
    master, other = new_key(), new_key()
    wrapped = wrap(master, KEY, "k|c-1")
    assert unwrap(master, wrapped, "k|c-1") == KEY
    with pytest.raises(SealError):
        unwrap(other, wrapped, "k|c-1")
    with pytest.raises(SealError):
        unwrap(master, wrapped, "k|c-2")


def test_keys_made_in_bulk_are_distinct_and_each_unwraps_under_its_own_context():
    master = new_key()
    maker = KeyMaker(master)
    made = maker.new_keys(50)
    assert len({key_id for key_id, _, _ in made}) == len({key for _, key, _ in made}) == 50
    assert len({nonce for _, _, nonce in made}) == 50
    assert all(len(key_id) == 32 and len(key) == 32 for key_id, key, _ in made)
    for key_id, key, nonce in made[:5]:
        assert unwrap(master, maker.wrap(key, f"{key_id}|c-1", nonce), f"{key_id}|c-1") == key


def test_a_seal_is_the_same_with_or_without_a_cipher_made_for_its_key():
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

    assert seal(KEY, KEY_ID, "e-1/payload.name", b'"Ada"', AESGCMSIV(KEY)) == seal(KEY, KEY_ID, "e-1/payload.name", b'"Ada"')


def test_identity_hashes_are_keyed_so_a_dictionary_of_plain_hashes_does_not_reverse_them():
    email = "ada@example.org"
    one, two = keyed_hash(b"secret-one", email), keyed_hash(b"secret-two", email)
    assert one != two and one == keyed_hash(b"secret-one", email)
    assert hashlib.sha256(email.encode()).hexdigest() not in (one, two)


def test_a_dead_letter_keeps_the_record_but_not_its_personal_values():
    item = {**registration(), "identifiers": {"email": "ada@example.org", "loyalty_card": "L-1"}}
    kept = redact(item)
    assert kept["payload"]["email"] == REDACTED and kept["payload"]["address"] == REDACTED
    assert kept["identifiers"] == {"email": REDACTED, "loyalty_card": "L-1"}
    assert kept["customer_id"] == "c-1" and redact([1, 2]) == [1, 2]
    sealed = seal_event(registration(), KEY_ID, KEY)
    assert redact(sealed)["payload"]["email"] == sealed["payload"]["email"]


def test_the_master_keyring_reads_as_configured_and_the_first_key_wraps(monkeypatch):
    ring = MasterKeyring(((("m2", new_key())), ("m1", new_key())))
    monkeypatch.setenv("CRM_MASTER_KEYS", ring.render().replace("\n", ","))
    parsed = master_keyring(state_dir=None)  # type: ignore[arg-type]
    assert parsed == ring and parsed.current[0] == "m2" and parsed.get("m1") == ring.keys[1][1]
    with pytest.raises(ValueError, match="base64"):
        MasterKeyring.parse("m1:short")


def test_unset_secrets_are_made_once_and_readable_only_by_their_owner(tmp_path, monkeypatch):
    monkeypatch.delenv("CRM_MASTER_KEYS", raising=False)
    monkeypatch.delenv("CRM_IDENTITY_SECRET", raising=False)
    first, secret = master_keyring(tmp_path), identity_secret(tmp_path)
    assert master_keyring(tmp_path) == first and identity_secret(tmp_path) == secret
    for name in ("master-keys", "identity-secret"):
        assert stat.S_IMODE((tmp_path / "secrets" / name).stat().st_mode) == 0o600
