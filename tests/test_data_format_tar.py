"""shard_bytes builds its tar with numpy; it must equal, byte for byte, what Python's ``tarfile`` writes for
the same members (the reference), and read back with ``tarfile`` to the samples."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from megadiff.data.format import sample_key, shard_bytes


def tarfile_shard(shard_file: str, samples: np.ndarray, mode: int = 0o644) -> bytes:
    """The reference: ``tarfile`` (USTAR) with the format's fixed member metadata."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(samples.shape[1], samples.dtype), version=(1, 0), allow_pickle=False)
    header = buf.getvalue()[: -samples.shape[1] * samples.dtype.itemsize]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j in range(samples.shape[0]):
            payload = header + samples[j].tobytes()
            ti = tarfile.TarInfo(f"{sample_key(shard_file, j)}.npy")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(payload), 0, mode, 0, 0, "", ""
            tar.addfile(ti, io.BytesIO(payload))
    return out.getvalue()


@pytest.mark.parametrize("name,n,seq_len,dtype", [
    ("train-000000.tar", 1, 8, "uint16"),            # payload not a multiple of 512
    ("train-000003-0002.tar", 7, 512, "uint16"),      # a pipeline partition's shard; 1152-byte payloads
    ("valid-000012-0000.tar", 3, 100, "uint32"),
    ("train-000001.tar", 20, 192, "uint16"),          # payload exactly 512 bytes; archive past one record
    ("/some/dir/train-000002.tar", 45, 64, "uint32"),  # a path: members are named by the file's stem
    ("train-000009-0001.tar", 1234, 4, "uint16"),     # four digits of the sample number vary
])
def test_shard_bytes_equals_tarfile(name, n, seq_len, dtype):
    rng = np.random.default_rng(n * seq_len)
    samples = rng.integers(0, np.iinfo(dtype).max, size=(n, seq_len), dtype=np.int64).astype(dtype)
    got = shard_bytes(name, samples)
    assert got == tarfile_shard(name, samples)
    with tarfile.open(fileobj=io.BytesIO(got), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{sample_key(name, j)}.npy" for j in range(n)]
        for j, m in enumerate(members):
            np.testing.assert_array_equal(np.load(io.BytesIO(tar.extractfile(m).read())), samples[j])


def test_member_name_array_equals_the_names_also_past_six_digits():
    """The numpy-built member names are the format's names (``_member_names``, f-strings), NUL-padded to
    the longest; past 10**6 samples the sample number takes a seventh digit."""
    from megadiff.data.format import _member_name_array, _member_names

    for name, n in (("valid-000012-0000.tar", 3), ("/d/train-000001.tar", 12345), ("train-000000.tar", 10**6 + 3)):
        got = _member_name_array(name, n)
        ref = _member_names(name, n)
        for j in (0, 1, n // 2, n - 2, n - 1):
            assert bytes(got[j]).rstrip(b"\0") == ref[j]
        assert got.shape == (n, max(map(len, ref)))
    assert bytes(got[10**6 - 1]) == b"train-000000-999999.npy\0" and bytes(got[10**6]) == b"train-000000-1000000.npy"


def test_shard_bytes_refuses_a_name_too_long_for_ustar():
    with pytest.raises(ValueError, match="longer than USTAR"):
        shard_bytes("x" * 120 + ".tar", np.zeros((1, 4), np.uint16))


def tarfile_offsets(path, expected: int) -> np.ndarray:
    """The reference index: ``tarfile`` member by member (-1 for a wrong name, and after an unreadable header)."""
    out = np.full(expected, -1, dtype=np.int64)
    try:
        with tarfile.open(path, mode="r:") as tar:
            for j, ti in enumerate(tar):
                if j < expected and ti.name == f"{sample_key(str(path), j)}.npy":
                    out[j] = ti.offset_data
    except tarfile.TarError:
        pass
    return out


@pytest.mark.parametrize("damage", ["none", "payload", "name", "checksum", "size", "truncated", "foreign"])
def test_index_shard_matches_tarfile_on_good_and_damaged_shards(tmp_path, damage):
    """The in-place (numpy) index of a shard equals tarfile's reading of it; a damaged header makes it fall
    back to tarfile, so the damaged member and those after it are found exactly as before."""
    from megadiff.data.format import _index_fixed_layout, index_shard

    rng = np.random.default_rng(1)
    samples = rng.integers(0, 50000, size=(12, 300), dtype=np.int64).astype(np.uint16)
    path = tmp_path / "train-000004-0001.tar"
    data = bytearray(shard_bytes(path.name, samples))
    rec = 512 + 1024  # 128-byte npy header + 600 bytes, padded
    if damage == "payload":
        data[5 * rec + 700] ^= 0xFF
    elif damage == "name":
        data[5 * rec + 3] ^= 0x01
    elif damage == "checksum":
        data[5 * rec + 150] = ord("9")
    elif damage == "size":
        data[5 * rec + 130] = ord("7")
    elif damage == "truncated":
        data = data[: 7 * rec + 40]
    elif damage == "foreign":  # a valid tar, written by tarfile with another owner: not our fixed layout
        data = bytearray(tarfile_shard(path.name, samples, mode=0o600))
    path.write_bytes(bytes(data))
    got = index_shard(path, len(samples))
    np.testing.assert_array_equal(got, tarfile_offsets(path, len(samples)))
    assert (_index_fixed_layout(path, len(samples)) is not None) == (damage in ("none", "payload"))
    first_bad = {"name": 5, "checksum": 5, "size": 5, "truncated": 7}.get(damage, len(samples))
    assert (got[:first_bad] >= 0).all() and (got[first_bad:] == -1).all()
