"""RFC 1624 incremental updates against a full RFC 1071 recomputation."""

from hypothesis import example, given
from hypothesis import strategies as st

from distributor import checksum
from tests.packets import rfc1071


def _with_checksum(header: bytearray) -> bytearray:
    header[0] = 0x45  # a real IPv4 header: its sum is never zero, so -0 cannot arise
    header[10:12] = b"\0\0"
    value = rfc1071(bytes(header))
    header[10:12] = value.to_bytes(2, "big")
    return header


@given(st.binary(min_size=20, max_size=20), st.binary(min_size=4, max_size=4))
@example(bytes(20), b"\xff\xff\xff\xff")
@example(b"\xff" * 20, b"\0\0\0\0")
@example(bytes(20), bytes(4))
def test_patched_checksum_equals_full_recomputation(header, new_address):
    original = _with_checksum(bytearray(header))
    old_address = bytes(original[16:20])
    patched = bytearray(original)
    patched[16:20] = new_address
    checksum.patch(patched, 10, checksum.delta(old_address, new_address))
    assert patched == _with_checksum(bytearray(patched))


def test_delta_rejects_odd_or_mismatched_lengths():
    import pytest

    with pytest.raises(ValueError):
        checksum.delta(b"abc", b"abd")
    with pytest.raises(ValueError):
        checksum.delta(b"ab", b"abcd")
