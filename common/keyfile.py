"""Reading a keys file from disk (the programs' side of :meth:`common.wire.Keys.parse`)."""

from __future__ import annotations

from pathlib import Path

from .wire import Keys, KeysError

__all__ = ["load_keys", "KeysFileMissing"]


class KeysFileMissing(KeysError):
    """The keys file is not there (yet): what a config check on another host may only warn about."""


def load_keys(path: str | Path, signing_id: int | None = None) -> Keys:
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError as exc:
        raise KeysFileMissing(f"cannot read keys file {str(path)!r}: {exc.strerror}") from None
    except OSError as exc:
        raise KeysError(f"cannot read keys file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise KeysError(f"keys file {str(path)!r} is not ASCII text (byte {exc.start}); expected 'KEY_ID HEX_SECRET' "
                        "lines") from None
    return Keys.parse(text, str(path), signing_id)
