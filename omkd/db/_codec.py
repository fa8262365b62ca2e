"""Between records and rows: validation, JSON fields and booleans, driven by the record types.

A :class:`RowCodec` knows a table's column list (the same text its SQL statements use) and the
record type; it finds the record's JSON fields (typed ``Any``) and bool fields from the type,
so a new field needs a column and nothing else here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import msgspec

from omkd.db import _json
from omkd.db.errors import InvalidData

__all__ = ["RowCodec", "field_of", "named_params", "validate"]

R = TypeVar("R", bound=msgspec.Struct)

_PATH_FIELD = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)")


def field_of(exc: msgspec.ValidationError, default: str = "record") -> str:
    """Return the top-level field a msgspec validation error points at, else ``default``."""
    match = _PATH_FIELD.search(str(exc))
    return match.group(1) if match else default


def validate(record: R) -> R:
    """Return ``record`` after checking every field against its declared type, strictly.

    Records built in Python are not type-checked by msgspec, so a float where money (int)
    belongs would otherwise reach the table. Raises InvalidData naming the field.
    """
    try:
        msgspec.convert(msgspec.structs.asdict(record), type(record), strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidData(field_of(exc), str(exc)) from exc
    return record


def named_params(columns: str) -> str:
    """Return ``:a, :b`` for the column list ``a, b`` (used to build constant statements)."""
    return ", ".join(f":{name}" for name in _names(columns))


def _names(columns: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in columns.split(","))


class RowCodec(Generic[R]):
    """Turns records of one type into statement parameters and rows back into records."""

    def __init__(self, record_type: type[R], columns: str) -> None:
        self.record_type = record_type
        self.names = _names(columns)
        info = msgspec.inspect.type_info(record_type)
        assert isinstance(info, msgspec.inspect.StructType)
        types = {f.name: f.type for f in info.fields}
        missing = set(types) ^ set(self.names)
        if missing:
            raise ValueError(f"{record_type.__name__} columns and fields differ: {missing}")
        self.json_fields = frozenset(
            n for n, t in types.items() if isinstance(t, msgspec.inspect.AnyType)
        )
        self.bool_fields = frozenset(
            n for n, t in types.items() if isinstance(t, msgspec.inspect.BoolType)
        )
        self.record: Callable[[Sequence[Any]], R] = self._compile_reader()
        """Return the record for a row whose columns are in this codec's order."""

    def params(self, record: R, encode_json: Callable[[Any, str], str | None]) -> dict[str, Any]:
        """Return the named parameters for ``record`` after validating it (InvalidData), its
        JSON fields encoded by ``encode_json`` (its scope's)."""
        validate(record)
        values = msgspec.structs.asdict(record)
        for name in self.json_fields:
            values[name] = encode_json(values[name], name)
        return values

    def _compile_reader(self) -> Callable[[Sequence[Any]], R]:
        # Reading pages of events is hot: one generated call per row, with the keyword
        # arguments spelled out, is about four times faster than building a dict per row.
        # The source is made only from this codec's column names, never from data.
        arguments = []
        for index, name in enumerate(self.names):
            if name in self.json_fields:
                arguments.append(f"{name}=decode(row[{index}], {name!r})")
            elif name in self.bool_fields:
                arguments.append(f"{name}=bool(row[{index}])")
            else:
                arguments.append(f"{name}=row[{index}]")
        source = f"lambda row: record_type({', '.join(arguments)})"
        namespace = {"record_type": self.record_type, "decode": _json.decode, "bool": bool}
        reader: Callable[[Sequence[Any]], R] = eval(source, namespace)
        return reader

    def records(self, rows: Sequence[Sequence[Any]]) -> list[R]:
        """Return the records for ``rows``."""
        record = self.record
        return [record(row) for row in rows]
