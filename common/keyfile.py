"""Reading a keys file from disk (the programs' side of :meth:`common.wire.Keys.parse`)."""

from __future__ import annotations

from pathlib import Path

from .wire import Keys, KeysError

__all__ = ["load_keys"]


def load_keys(path: str | Path, signing_id: int | None = None) -> Keys:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeysError(f"cannot read keys file {str(path)!r}: {exc.strerror}") from None
    return Keys.parse(text, str(path), signing_id)
