"""JSON fields: stored as compact JSON text (NULL for None), read back as native values."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from omkd.db.errors import InvalidData, StorageFailure

__all__ = ["decode", "encode", "encode_unchecked"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(value: Any, field: str) -> str | None:
    """Return ``value`` as compact JSON text, or None for None.

    Raises InvalidData naming ``field`` when the value is not JSON: besides what msgspec
    cannot encode at all, what it would turn into something else (NaN and infinities into
    null, bytes into base64, dates, UUIDs and decimals into strings, sets into arrays,
    non-string keys into strings), which would be read back as other values.
    """
    if value is None:
        return None
    problem = _not_json(value, 0)
    if problem is not None:
        raise InvalidData(field, f"not a JSON value: {problem}")
    return encode_unchecked(value, field)


def encode_unchecked(value: Any, field: str) -> str | None:
    """``encode`` for a value known to be JSON, as one a JSON decoder made (a third of the
    cost: the check walks the value in Python). Raises InvalidData only for what msgspec
    cannot encode."""
    if value is None:
        return None
    try:
        return _encoder.encode(value).decode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidData(field, f"not a JSON value ({exc})") from exc
    except RecursionError as exc:
        raise InvalidData(field, "nested too deep to encode") from exc


_SCALARS = frozenset({str, int, bool, type(None)})
MAX_DEPTH = 500
"""How deep a JSON value given to ``encode`` may nest (its check recurses in Python)."""
_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"


def _not_json(value: Any, depth: int) -> str | None:
    """What in ``value`` is not a JSON value (None if nothing is): a type, or where."""
    kind = type(value)
    if kind in _SCALARS:
        return None
    if kind is float:
        return None if math.isfinite(value) else f"{value!r} (JSON has no such number)"
    if depth >= MAX_DEPTH:
        return _TOO_DEEP
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                return f"key {key!r} (keys are strings)"
            if type(item) not in _SCALARS:
                problem = _not_json(item, depth + 1)
                if problem is not None:
                    return _at(f"[{key!r}]", problem)
        return None
    if kind is list or kind is tuple:
        for index, item in enumerate(value):
            if type(item) not in _SCALARS:
                problem = _not_json(item, depth + 1)
                if problem is not None:
                    return _at(f"[{index}]", problem)
        return None
    # Subclasses of the JSON types (an IntEnum, an OrderedDict) are what they extend.
    for base in (str, int, float, dict, list, tuple):
        if isinstance(value, base):
            return _not_json(base(value), depth)  # type: ignore[arg-type]
    return f"a {kind.__name__}"


def _at(where: str, problem: str) -> str:
    if problem is _TOO_DEEP:
        return problem
    return f"{where}{problem}" if problem.startswith("[") else f"{where}: {problem}"


def decode(text: str | None, field: str) -> Any:
    """Return the native value of stored JSON ``text`` (None for NULL).

    Raises StorageFailure when the stored text is not JSON (the file was changed outside omkd).
    """
    if text is None:
        return None
    try:
        return _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise StorageFailure(f"stored {field} is not valid JSON: {exc}", field=field) from exc
