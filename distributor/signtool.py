"""``distributor-sign``: make operator keys and sign task bundles (see :mod:`common.bundle`).

Subcommands::

    distributor-sign keygen --out operator.key          # writes operator.key (0600) and operator.key.pub
    distributor-sign sign --key operator.key --name clean-tmp --version 1 --priority low \\
        --time-limit 60 --memory-limit 64 --entry run.sh run.sh [more files] --out clean-tmp.bundle
    distributor-sign verify --trust operator.key.pub clean-tmp.bundle
    distributor-sign show clean-tmp.bundle

Contract: exit 0 on success, 1 when a bundle does not verify, 2 on a usage or
input error (the message names the file or the value).  :func:`add_commands`
mounts the same subcommands on another argparse parser (``distributorctl bundle ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import bundle as bundles

__all__ = ["add_commands", "main", "load_trusted"]


def load_trusted(values: list[str]) -> list[bytes]:
    """Public keys given as ``ed25519:...`` text or as files holding such lines."""
    keys = []
    for value in values:
        if value.startswith("ed25519:"):
            keys.append(bundles.parse_public_key(value))
            continue
        try:
            text = Path(value).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read public key file {value!r}: {exc.strerror}") from None
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                keys.append(bundles.parse_public_key(line))
    return keys


def _keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"distributor-sign: {out} exists; use --force to replace it", file=sys.stderr)
        return 2
    key = bundles.generate_private_key()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(bundles.private_key_pem(key))
    public = bundles.public_key_text(key)
    Path(f"{out}.pub").write_text(public + "\n")
    print(f"{public}  (fingerprint {bundles.fingerprint(bundles.parse_public_key(public))}; private key in {out})")
    return 0


def _sign(args: argparse.Namespace) -> int:
    try:
        key = bundles.load_private_key(Path(args.key).read_bytes())
    except OSError as exc:
        print(f"distributor-sign: cannot read key {args.key!r}: {exc.strerror}", file=sys.stderr)
        return 2
    files = {}
    for name in args.files:
        path = Path(name)
        try:
            files[path.name] = path.read_bytes()
        except OSError as exc:
            print(f"distributor-sign: cannot read {name!r}: {exc.strerror}", file=sys.stderr)
            return 2
    executable = {Path(n).name for n in args.files if os.access(n, os.X_OK)}
    data = bundles.make_bundle(key, args.name, args.version, args.priority, args.time_limit, args.memory_limit,
                               args.entry, files, executable, args.description, round(time.time()))
    out = Path(args.out or f"{args.name}.bundle")
    out.write_bytes(data)
    print(f"signed {out}: {args.name} version {args.version}, {len(files)} file(s), {len(data)} bytes")
    return 0


def _verify(args: argparse.Namespace) -> int:
    trusted = load_trusted(args.trust)
    try:
        opened = bundles.open_bundle(Path(args.bundle).read_bytes(), trusted)
    except bundles.BundleRefused as exc:
        print(f"distributor-sign: {args.bundle}: refused ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    print(f"{args.bundle}: signature OK (key {opened.key}); {opened.manifest.name} version {opened.manifest.version}")
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        document = json.loads(Path(args.bundle).read_bytes())
        print(json.dumps({"manifest": document["manifest"], "signed_by": document["signature"]["key"]}, indent=2))
    except (ValueError, KeyError, TypeError) as exc:
        print(f"distributor-sign: {args.bundle} is not a bundle: {exc}", file=sys.stderr)
        return 2
    return 0


def add_commands(subparsers) -> None:
    keygen = subparsers.add_parser("keygen", help="make an operator Ed25519 key pair")
    keygen.add_argument("--out", required=True, help="private key file (the public key goes to FILE.pub)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.set_defaults(handler=_keygen)

    sign = subparsers.add_parser("sign", help="sign a task bundle")
    sign.add_argument("--key", required=True, help="the operator's private key file")
    sign.add_argument("--name", required=True, help="task name: 1-64 of a-z 0-9 - _")
    sign.add_argument("--version", type=int, default=1, help="bundle version; nodes refuse to go back to a lower one")
    sign.add_argument("--priority", choices=bundles.PRIORITIES, default="low", help="the highest priority it may run at")
    sign.add_argument("--time-limit", type=float, default=60.0, help="seconds of wall time before it is killed")
    sign.add_argument("--memory-limit", type=int, default=64, help="MiB of address space (RLIMIT_AS)")
    sign.add_argument("--entry", required=True, help="the file to execute (made executable in the bundle)")
    sign.add_argument("--description", default="")
    sign.add_argument("--out", help="output file (default NAME.bundle)")
    sign.add_argument("files", nargs="+", help="the bundle's files (flat: their base names are kept)")
    sign.set_defaults(handler=_sign)

    verify = subparsers.add_parser("verify", help="check a bundle's signature against trusted public keys")
    verify.add_argument("--trust", action="append", required=True, help="ed25519:... text or a .pub file (repeatable)")
    verify.add_argument("bundle")
    verify.set_defaults(handler=_verify)

    show = subparsers.add_parser("show", help="print a bundle's manifest (without verifying it)")
    show.add_argument("bundle")
    show.set_defaults(handler=_show)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distributor-sign", description="Operator keys and signed task bundles.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_commands(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, bundles.BundleRefused) as exc:
        print(f"distributor-sign: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a bundle, key or directory that is missing or unreadable
        print(f"distributor-sign: cannot read {exc.filename!r}: {exc.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
