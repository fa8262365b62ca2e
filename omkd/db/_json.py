"""JSON fields: stored as compact JSON text (NULL for None), read back as native values."""

from __future__ import annotations

from typing import Any

import msgspec

from omkd.db.errors import InvalidData, StorageFailure

__all__ = ["decode", "encode"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(value: Any, field: str) -> str | None:
    """Return ``value`` as compact JSON text, or None for None.

    Raises InvalidData naming ``field`` when the value is not JSON.
    """
    if value is None:
        return None
    try:
        return _encoder.encode(value).decode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidData(field, f"not a JSON value ({exc})") from exc


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
