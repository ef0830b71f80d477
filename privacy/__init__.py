"""Personal data: sealing at the edge, data keys and their erasure (docs/privacy.md).

`seal.py` and `fields.py` are pure (bytes and dicts in, bytes and dicts out); `secrets.py` reads the
master keys and the identity secret from configuration; `keystore.py` keeps the customers' wrapped
data keys in a compacted Kafka topic."""
