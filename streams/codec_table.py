"""A table of bytes (a Faust table, or a RocksDB handle in the rebuild) seen as a mapping of
str -> domain object, values stored as orjson bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

import orjson

T = TypeVar("T")


class CodecTable(MutableMapping[str, T], Generic[T]):
    def __init__(self, table: Any, decode: Callable[[Any], T] = lambda data: data,
                 encode: Callable[[T], Any] = lambda data: data):
        self._table, self._decode, self._encode = table, decode, encode

    def __getitem__(self, key: str) -> T:
        raw = self._table[key.encode()]
        return self._decode(orjson.loads(raw))

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._table.get(key.encode())
        return default if raw is None else self._decode(orjson.loads(raw))

    def __setitem__(self, key: str, value: T) -> None:
        self._table[key.encode()] = orjson.dumps(self._encode(value))

    def __delitem__(self, key: str) -> None:
        del self._table[key.encode()]

    def __iter__(self) -> Iterator[str]:
        return (key.decode() for key in self._table.keys())

    def __len__(self) -> int:
        return sum(1 for _ in self._table.keys())
