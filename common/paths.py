"""Which names the administration may write: managed paths and bundle names (pure: strings in, verdicts out).

Both sides use these rules: the distributor to refuse an operator's mistake early
(:mod:`distributor.content`, :mod:`distributor.blobstore`), the node to refuse it whatever the
distributor says (:mod:`node.store`, :mod:`node.broker`).  One definition, so the two can never
disagree on what is inside the document root.

Contract
--------
* :func:`check_path` returns a valid managed path unchanged and raises :class:`PathRefused`
  otherwise.  Valid: a relative POSIX path of components separated by single ``/``; no ``..``
  (traversal), no leading ``/`` (absolute), no NUL, no ``.`` or empty component, no control
  character or backslash, at most 255 bytes a component (``NAME_MAX``) and 1024 in all, and no
  component starting with :data:`TEMP_PREFIX` (the broker's temporary files).  The check is
  lexical only: the node still walks every component with ``O_NOFOLLOW`` (:mod:`node.store`).
* :func:`check_bundle_name` does the same for a task bundle's name: 1-64 of ``a-z 0-9 - _``,
  starting with a letter or digit (so a name is also a safe flat file name).
* :attr:`PathRefused.reason` is the refusal counter's label: ``bad_path``, ``traversal``,
  ``absolute``, ``nul`` or ``reserved``.
"""

from __future__ import annotations

import re

__all__ = ["TEMP_PREFIX", "MAX_PATH_BYTES", "MAX_COMPONENT_BYTES", "PathRefused", "check_path", "check_bundle_name"]

TEMP_PREFIX = ".admin-tmp-"
MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux filesystems
_BUNDLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class PathRefused(ValueError):
    """A path that is not a valid managed path; ``reason`` is the refusal counter's label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_path(path: object) -> str:
    """``path`` itself when it is a valid managed path; raises :class:`PathRefused` otherwise."""
    if not isinstance(path, str) or not path:
        raise PathRefused("bad_path", f"path {path!r} is not valid; expected a non-empty relative path such as \"docs/index.html\"")
    if "\0" in path:
        raise PathRefused("nul", f"path {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise PathRefused("absolute", f"path {path!r} is absolute; expected a path relative to the document root")
    raw = path.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_PATH_BYTES:
        raise PathRefused("bad_path", f"path of {len(raw)} bytes is too long; at most {MAX_PATH_BYTES}")
    for component in path.split("/"):
        if component == "..":
            raise PathRefused("traversal", f"path {path!r} climbs out with '..'")
        if component in ("", "."):
            raise PathRefused("bad_path", f"path {path!r} has an empty or '.' component; write each component once, separated by one '/'")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in component) or "\\" in component:
            raise PathRefused("bad_path", f"path {path!r} contains a control character or a backslash")
        if len(component.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise PathRefused("bad_path", f"path {path!r} has a component longer than {MAX_COMPONENT_BYTES} bytes")
        if component.startswith(TEMP_PREFIX):
            raise PathRefused("reserved", f"path {path!r}: names starting with {TEMP_PREFIX!r} are the broker's temporary files")
    return path


def check_bundle_name(name: object) -> str:
    """A task bundle's name: 1-64 of a-z, 0-9, '-', '_', starting with a letter or digit."""
    if not isinstance(name, str) or not _BUNDLE_NAME.match(name):
        raise PathRefused("bad_path", f"bundle name {name!r} is not valid; expected 1-64 of a-z 0-9 - _, starting with a letter or digit")
    return name
