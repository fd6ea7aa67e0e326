"""Signed task bundles: a script and its manifest, signed by an operator's Ed25519 key.

A bundle lets an operator add a task to every node without reinstalling the
agents (the paper's downloadable agents), and a node runs one only if an
operator key it trusts signed it (the paper's future work: signed code).

Format: one JSON document (UTF-8)::

    {"format": "distributor-bundle/1",
     "manifest": {"name": "clean-tmp", "version": 3, "priority": "low",
                  "time_limit": 60, "memory_limit": 64, "entry": "run.sh",
                  "description": "...", "signed_at": 1700000000,
                  "files": {"run.sh": {"sha256": "...", "executable": true}}},
     "signature": {"key": "<fingerprint>", "ed25519": "<base64 of 64 bytes>"},
     "files": {"run.sh": "<base64>"}}

Contract
--------
* The signature covers ``b"distributor-bundle/1\\n"`` followed by the
  manifest serialised canonically (sorted keys, no spaces, ASCII), and the
  manifest pins every file by SHA-256, so no byte of a bundle can change
  without failing :func:`open_bundle`.
* :func:`open_bundle` never trusts anything before the signature verified:
  size and JSON shape first, then the key (by fingerprint, the first 16 hex
  digits of the SHA-256 of its 32 raw bytes) among the trusted ones, the
  signature, then the manifest's fields and the files' digests.  Refusals
  raise :class:`BundleRefused` with a reason label (``bad_bundle``,
  ``untrusted_key``, ``bad_signature``).
* Names: the bundle's name follows :func:`common.paths.check_bundle_name`;
  file names are flat (``[A-Za-z0-9][A-Za-z0-9._-]*``, no directories), so
  unpacking cannot write outside the bundle's own directory.
* Keys: a private key is a PKCS#8 PEM file (mode 0600); a public key is the
  text ``ed25519:<base64 of 32 bytes>`` (what nodes list as trusted).
* No file I/O and no clock (``signed_at`` is passed in), but an adapter in the
  layers: it binds OpenSSL through ``cryptography``, and a new key is drawn
  from the kernel's random source, so not every answer follows from the inputs.
  Shared by the node (:func:`open_bundle`) and ``distributor-sign``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .paths import PathRefused, check_bundle_name

__all__ = [
    "FORMAT",
    "MAX_BUNDLE_BYTES",
    "BundleRefused",
    "BundleManifest",
    "check_manifest",
    "Bundle",
    "generate_private_key",
    "private_key_pem",
    "load_private_key",
    "public_key_text",
    "parse_public_key",
    "fingerprint",
    "make_bundle",
    "open_bundle",
]

FORMAT = "distributor-bundle/1"
MAX_BUNDLE_BYTES = 4 << 20
MAX_FILES = 64
PRIORITIES = ("high", "normal", "low")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TAG = b"distributor-bundle/1\n"


class BundleRefused(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BundleManifest:
    name: str
    version: int
    priority: str
    time_limit: float  # seconds of wall time
    memory_limit: int  # MiB of address space (RLIMIT_AS)
    entry: str  # the file to execute
    files: Mapping[str, Mapping[str, Any]]  # name -> {"sha256", "executable"}
    description: str = ""
    signed_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "priority": self.priority,
                "time_limit": self.time_limit, "memory_limit": self.memory_limit, "entry": self.entry,
                "files": {n: dict(f) for n, f in sorted(self.files.items())}, "description": self.description,
                "signed_at": self.signed_at}


@dataclass(frozen=True)
class Bundle:
    manifest: BundleManifest
    key: str  # fingerprint of the key that signed it
    files: Mapping[str, bytes]


def _crypto():
    # Imported on first use: the agent's memory budget is tight and most runs never touch a bundle.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519, serialization, InvalidSignature


def generate_private_key():
    ed25519, _, _ = _crypto()
    return ed25519.Ed25519PrivateKey.generate()


def private_key_pem(key) -> bytes:
    _, serialization, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(pem: bytes):
    ed25519, serialization, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"the private key is {type(key).__name__}; expected an Ed25519 key")
    return key


def _raw_public(key) -> bytes:
    _, serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(private_or_public) -> str:
    key = private_or_public.public_key() if hasattr(private_or_public, "sign") else private_or_public
    return "ed25519:" + base64.b64encode(_raw_public(key)).decode()


def parse_public_key(text: str) -> bytes:
    """The 32 raw bytes of an ``ed25519:BASE64`` public key; ValueError naming what is wrong."""
    head, _, tail = text.strip().partition(":")
    if head != "ed25519":
        raise ValueError(f"public key {text[:40]!r} is not valid; expected \"ed25519:<base64 of 32 bytes>\"")
    try:
        raw = base64.b64decode(tail.split()[0] if tail.split() else "", validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"public key {text[:40]!r} is not valid; expected \"ed25519:<base64 of 32 bytes>\"")
    return raw


def fingerprint(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    return _TAG + json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def check_manifest(data: Any) -> BundleManifest:
    """A bundle's manifest, checked as a node checks it (BundleRefused "bad_bundle" naming what is wrong)."""
    def refuse(message: str) -> BundleRefused:
        return BundleRefused("bad_bundle", f"bundle manifest: {message}")

    if not isinstance(data, dict):
        raise refuse("expected an object")
    known = {"name", "version", "priority", "time_limit", "memory_limit", "entry", "files", "description", "signed_at"}
    if set(data) - known:
        raise refuse(f"unknown field {sorted(set(data) - known)[0]!r}")
    try:
        name = check_bundle_name(data.get("name"))
    except PathRefused as exc:
        raise refuse(str(exc)) from None
    version, priority = data.get("version"), data.get("priority")
    time_limit, memory_limit, entry = data.get("time_limit"), data.get("memory_limit"), data.get("entry")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise refuse(f"version {version!r} is not valid; expected an integer >= 1")
    if priority not in PRIORITIES:
        raise refuse(f"priority {priority!r} is not valid; expected one of {', '.join(PRIORITIES)}")
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not 0 < time_limit <= 86400:
        raise refuse(f"time_limit {time_limit!r} is not valid; expected seconds in (0, 86400]")
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or not 8 <= memory_limit <= 65536:
        raise refuse(f"memory_limit {memory_limit!r} is not valid; expected MiB from 8 to 65536")
    files = data.get("files")
    if not isinstance(files, dict) or not 1 <= len(files) <= MAX_FILES:
        raise refuse(f"files: expected an object of 1 to {MAX_FILES} file names")
    for file_name, meta in files.items():
        if not _FILE_NAME.match(file_name):
            raise refuse(f"file name {file_name!r} is not valid; expected [A-Za-z0-9][A-Za-z0-9._-]*, no directories")
        if not isinstance(meta, dict) or set(meta) != {"sha256", "executable"} or not isinstance(meta["executable"], bool):
            raise refuse(f"files[{file_name!r}]: expected {{\"sha256\": HEX, \"executable\": BOOL}}")
    if entry not in files or not files[entry]["executable"]:
        raise refuse(f"entry {entry!r} is not an executable file of the bundle")
    description, signed_at = data.get("description", ""), data.get("signed_at", 0.0)
    if not isinstance(description, str) or isinstance(signed_at, bool) or not isinstance(signed_at, (int, float)):
        raise refuse("description must be a string and signed_at a number")
    return BundleManifest(name, version, priority, float(time_limit), memory_limit, entry, files, description,
                          float(signed_at))


def make_bundle(private_key, name: str, version: int, priority: str, time_limit: float, memory_limit: int,
                entry: str, files: Mapping[str, bytes], executable: Iterable[str] = (), description: str = "",
                signed_at: float = 0.0) -> bytes:
    """The bytes of a signed bundle; raises BundleRefused when the manifest would not be valid."""
    executable = set(executable) | {entry}
    manifest = {
        "name": name, "version": version, "priority": priority, "time_limit": time_limit,
        "memory_limit": memory_limit, "entry": entry, "description": description, "signed_at": signed_at,
        "files": {n: {"sha256": hashlib.sha256(data).hexdigest(), "executable": n in executable}
                  for n, data in sorted(files.items())},
    }
    check_manifest(manifest)
    signature = private_key.sign(_canonical(manifest))
    document = {
        "format": FORMAT,
        "manifest": manifest,
        "signature": {"key": fingerprint(_raw_public(private_key.public_key())),
                      "ed25519": base64.b64encode(signature).decode()},
        "files": {n: base64.b64encode(data).decode() for n, data in sorted(files.items())},
    }
    data = json.dumps(document, indent=1, sort_keys=True).encode()
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleRefused("bad_bundle", f"bundle of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}")
    return data


def open_bundle(data: bytes, trusted: Iterable[bytes]) -> Bundle:
    """The verified bundle in ``data``, signed by one of the ``trusted`` raw public keys."""
    ed25519, _, InvalidSignature = _crypto()
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleRefused("bad_bundle", f"bundle of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleRefused("bad_bundle", f"bundle is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleRefused("bad_bundle", f"bundle format is not {FORMAT!r}")
    signature, manifest_data, encoded = document.get("signature"), document.get("manifest"), document.get("files")
    if not isinstance(signature, dict) or not isinstance(manifest_data, dict) or not isinstance(encoded, dict):
        raise BundleRefused("bad_bundle", "bundle lacks its signature, manifest or files")
    keys = {fingerprint(raw): raw for raw in trusted}
    key_id = signature.get("key")
    if key_id not in keys:
        raise BundleRefused("untrusted_key", f"bundle signed by key {str(key_id)[:16]!r}, which this node does not trust "
                                             f"(trusted: {', '.join(sorted(keys)) or 'none'})")
    try:
        raw_signature = base64.b64decode(str(signature.get("ed25519", "")), validate=True)
        ed25519.Ed25519PublicKey.from_public_bytes(keys[key_id]).verify(raw_signature, _canonical(manifest_data))
    except (binascii.Error, InvalidSignature, ValueError):
        raise BundleRefused("bad_signature", f"bundle signature does not verify with key {key_id}") from None
    manifest = check_manifest(manifest_data)
    files = {}
    if set(encoded) != set(manifest.files):
        raise BundleRefused("bad_bundle", "bundle files differ from the ones its manifest lists")
    for file_name, meta in manifest.files.items():
        try:
            content = base64.b64decode(str(encoded[file_name]), validate=True)
        except binascii.Error:
            raise BundleRefused("bad_bundle", f"bundle file {file_name!r} is not base64") from None
        if hashlib.sha256(content).hexdigest() != meta["sha256"]:
            raise BundleRefused("bad_signature", f"bundle file {file_name!r} does not match its signed digest")
        files[file_name] = content
    return Bundle(manifest, key_id, files)
