"""Signed task bundles: what verifies, what is refused and why, and the operator's signing tool."""

import base64
import json

import pytest

from common import bundle as bundles
from distributor.signtool import main as sign_main

KEY = bundles.generate_private_key()
TRUSTED = [bundles.parse_public_key(bundles.public_key_text(KEY))]
SCRIPT = b"#!/bin/sh\necho hello from a bundle\n"


def make(**overrides):
    fields = dict(name="hello", version=1, priority="low", time_limit=10, memory_limit=64, entry="run.sh",
                  files={"run.sh": SCRIPT, "data.txt": b"x"})
    fields.update(overrides)
    return bundles.make_bundle(KEY, **fields)


def refused(reason, data, trusted=TRUSTED):
    with pytest.raises(bundles.BundleRefused) as caught:
        bundles.open_bundle(data, trusted)
    assert caught.value.reason == reason, caught.value
    return caught.value


def tamper(data, change):
    document = json.loads(data)
    change(document)
    return json.dumps(document).encode()


def test_a_signed_bundle_opens_with_its_files_and_manifest():
    opened = bundles.open_bundle(make(), TRUSTED)
    assert opened.manifest.name == "hello" and opened.manifest.entry == "run.sh"
    assert opened.files == {"run.sh": SCRIPT, "data.txt": b"x"}
    assert opened.manifest.files["run.sh"]["executable"] and not opened.manifest.files["data.txt"]["executable"]
    assert opened.key == bundles.fingerprint(TRUSTED[0])


@pytest.mark.parametrize("change", [
    lambda d: d["manifest"].update(priority="high"),  # raise its own priority
    lambda d: d["manifest"].update(memory_limit=4096),
    lambda d: d["manifest"]["files"]["run.sh"].update(sha256="0" * 64),
    lambda d: d["signature"].update(ed25519=base64.b64encode(b"\0" * 64).decode()),
    lambda d: d["signature"].update(ed25519="not base64!"),
])
def test_any_change_to_the_signed_manifest_breaks_the_signature(change):
    refused("bad_signature", tamper(make(), change))


def test_a_changed_file_does_not_match_its_signed_digest():
    refused("bad_signature", tamper(make(), lambda d: d["files"].update({"run.sh": base64.b64encode(b"rm -rf /").decode()})))


def test_a_key_the_node_does_not_trust_is_refused():
    other = bundles.generate_private_key()
    refused("untrusted_key", bundles.make_bundle(other, "hello", 1, "low", 10, 64, "run.sh", {"run.sh": SCRIPT}))
    refused("untrusted_key", make(), trusted=[])


@pytest.mark.parametrize("data", [b"not json", b"{}", json.dumps({"format": "other"}).encode(), b"x" * (5 << 20)])
def test_malformed_bundles_are_refused(data):
    refused("bad_bundle", data)


def test_files_must_be_flat_and_the_fields_valid():
    with pytest.raises(bundles.BundleRefused, match="no directories"):
        make(files={"../run.sh": SCRIPT}, entry="../run.sh")
    with pytest.raises(bundles.BundleRefused, match="priority"):
        make(priority="urgent")
    with pytest.raises(bundles.BundleRefused, match="entry"):
        make(entry="missing.sh")
    with pytest.raises(bundles.BundleRefused, match="bundle name"):
        make(name="Bad/Name")


def test_public_key_text_round_trips_and_bad_text_is_refused():
    text = bundles.public_key_text(KEY)
    assert text.startswith("ed25519:") and bundles.parse_public_key(text) == TRUSTED[0]
    for bad in ["rsa:AAAA", "ed25519:", "ed25519:AAAA", "ed25519:!!"]:
        with pytest.raises(ValueError):
            bundles.parse_public_key(bad)


def test_the_signing_tool_makes_keys_signs_and_verifies(tmp_path, capsys):
    key = tmp_path / "operator.key"
    assert sign_main(["keygen", "--out", str(key)]) == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    script = tmp_path / "run.sh"
    script.write_bytes(SCRIPT)
    out = tmp_path / "hello.bundle"
    assert sign_main(["sign", "--key", str(key), "--name", "hello", "--entry", "run.sh", "--priority", "normal",
                      str(script), "--out", str(out)]) == 0
    assert sign_main(["verify", "--trust", f"{key}.pub", str(out)]) == 0
    other = tmp_path / "other.key"
    assert sign_main(["keygen", "--out", str(other)]) == 0
    capsys.readouterr()
    assert sign_main(["verify", "--trust", f"{other}.pub", str(out)]) == 1
    assert "untrusted_key" in capsys.readouterr().err
    assert sign_main(["keygen", "--out", str(key)]) == 2  # never overwrites a key by accident
    opened = bundles.open_bundle(out.read_bytes(), [bundles.parse_public_key((tmp_path / "operator.key.pub").read_text())])
    assert opened.manifest.priority == "normal"
