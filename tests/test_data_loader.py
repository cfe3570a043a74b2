"""Loader (Contract 1) on real shard files: random access, resume, DP sharding, mixtures, bad inputs.

Datasets here are written by megadiff.data.format.write_dataset (the same tar/manifest layout as the
Ray pipeline, which tests/test_data_pipeline.py covers); sample i of a split holds tokens
``base + i`` in its first position so tests can tell exactly which sample they got.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from megadiff import MegadiffError
from megadiff.data.format import check_compat, describe, read_manifest, shard_bytes, verify_dir, write_dataset
from megadiff.data.loader import GlobalBatchLoader, ShardDataset
from megadiff.data.tokenizer import special_ids, to_bytes, toy_tokenizer

L = 16
VOCAB = 5000


def make_ds(path: Path, n: int, base: int = 10, per_shard: int = 7, vocab: int = VOCAB, valid: int = 5) -> Path:
    tok = toy_tokenizer(64)
    rng = np.random.default_rng(n)
    tr = rng.integers(4, vocab, size=(n, L))
    tr[:, 0] = base + np.arange(n)  # sample identity
    va = rng.integers(4, vocab, size=(valid, L))
    write_dataset(path, {"train": tr, "valid": va}, to_bytes(tok), special_ids(tok), vocab, per_shard)
    return path


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory) -> Path:
    return make_ds(tmp_path_factory.mktemp("ds") / "a", 50)


def ids_of(batches) -> list[int]:
    return [int(x) for b in batches for x in b["tokens"][:, 0]]


def test_random_access_and_info(ds_dir):
    ds = ShardDataset(ds_dir, "train")
    assert len(ds) == 50 and ds.info.seq_len == L and ds.info.dtype == "uint16"
    assert (ds.info.mask_id, ds.info.pad_id, ds.info.eos_id, ds.info.bos_id) == (0, 1, 2, 3)
    assert [int(ds[i][0]) for i in (0, 6, 7, 49, -1)] == [10, 16, 17, 59, 59]
    assert ds[3].dtype == np.int64 and ds[3].shape == (L,)
    assert len(ShardDataset(ds_dir, "valid")) == 5
    with pytest.raises(IndexError):
        ds[50]
    with pytest.raises(MegadiffError, match="no split 'test'"):
        ShardDataset(ds_dir, "test")


def test_shards_are_deterministic_tar_with_npy_members(ds_dir):
    import io
    import tarfile

    m = read_manifest(ds_dir)
    first = m["splits"]["train"]["shards"][0]
    data = (ds_dir / first["file"]).read_bytes()
    arr = np.stack([ShardDataset(ds_dir)[i] for i in range(7)]).astype(np.uint16)
    assert shard_bytes("train-000000.tar", arr) == data  # same samples -> same bytes
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [t.name for t in members[:2]] == ["train-000000-000000.npy", "train-000000-000001.npy"]
        assert {(t.mtime, t.uid, t.gid, t.mode) for t in members} == {(0, 0, 0, 0o644)}
        assert np.array_equal(np.load(io.BytesIO(tar.extractfile(members[1]).read())), arr[1])


def test_global_batch_independent_of_dp_and_disjoint_cover(ds_dir):
    ds = ShardDataset(ds_dir)
    G = 10  # 50 samples: one epoch = 5 global batches
    full = [ids_of(GlobalBatchLoader([ds], None, G, 5, 0, 1, seed=3).next_global()) for _ in range(1)]
    ref = GlobalBatchLoader([ds], None, G, 5, 0, 1, seed=3)
    epoch_ref = [ids_of(ref.next_global()) for _ in range(5)]
    assert full[0] == epoch_ref[0]
    assert sorted(x for b in epoch_ref for x in b) == list(range(10, 60))  # an epoch covers every sample once
    for dp in (2, 5):
        ranks = [GlobalBatchLoader([ds], None, G, 1, r, dp, seed=3) for r in range(dp)]
        for s in range(5):
            parts = [ids_of(rk.next_global()) for rk in ranks]
            assert sum(parts, []) == epoch_ref[s]  # rank r has rows [r*G/dp, (r+1)*G/dp)
            assert len(set(sum(parts, []))) == G  # disjoint
    other_seed = GlobalBatchLoader([ds], None, G, 5, 0, 1, seed=4)
    assert [ids_of(other_seed.next_global()) for _ in range(5)] != epoch_ref


def test_sample_ids_and_micro_batches(ds_dir):
    ld = GlobalBatchLoader([ShardDataset(ds_dir)], None, 8, 2, dp_rank=1, dp_size=2, seed=0)
    ld.next_global()
    mbs = ld.next_global()
    assert len(mbs) == 2 and all(mb["tokens"].shape == (2, L) for mb in mbs)
    assert [int(x) for mb in mbs for x in mb["sample_ids"]] == [12, 13, 14, 15]  # s*G + row, s=1, rows 4..7
    assert str(mbs[0]["tokens"].dtype) == "torch.int64"


def test_epochs_reshuffle_and_resume_exact(ds_dir):
    ds = ShardDataset(ds_dir)
    ld = GlobalBatchLoader([ds], None, 10, 5, 0, 1, seed=7)
    stream = [ids_of(ld.next_global()) for _ in range(12)]  # 2.4 epochs
    e0, e1 = sum(stream[:5], []), sum(stream[5:10], [])
    assert sorted(e0) == sorted(e1) == list(range(10, 60)) and e0 != e1
    # resume mid-epoch from a fresh loader with the same DP size and with another DP size
    a = GlobalBatchLoader([ds], None, 10, 5, 0, 1, seed=7)
    for _ in range(3):
        a.next_global()
    sd = json.loads(json.dumps(a.state_dict()))  # survives serialisation
    assert sd["global_step"] == 3
    b = GlobalBatchLoader([ds], None, 10, 5, 0, 1, seed=7)
    b.load_state_dict(sd)
    assert [ids_of(b.next_global()) for _ in range(9)] == stream[3:]
    ranks = [GlobalBatchLoader([ds], None, 10, 5, r, 2, seed=7) for r in range(2)]
    for rk in ranks:
        rk.load_state_dict(sd)
    assert [sum((ids_of(rk.next_global()) for rk in ranks), []) for _ in range(9)] == stream[3:]
    with pytest.raises(MegadiffError, match="seed"):
        GlobalBatchLoader([ds], None, 10, 5, 0, 1, seed=8).load_state_dict(sd)


def test_mixture_weights(ds_dir, tmp_path):
    other = make_ds(tmp_path / "b", 30, base=1000)
    dsa, dsb = ShardDataset(ds_dir), ShardDataset(other)
    ld = GlobalBatchLoader([dsa, dsb], [3.0, 1.0], 8, 4, 0, 1, seed=1)
    assert ld.quotas == [6, 2]
    rows = [ids_of(ld.next_global()) for _ in range(15)]
    for r in rows:
        assert sum(x >= 1000 for x in r) == 2
    b_ids = [x for r in rows for x in r if x >= 1000]
    assert sorted(b_ids) == sorted(list(range(1000, 1030)))  # 15*2 = one epoch of b, no repeats
    sd = ld.state_dict()
    assert set(sd) == {"global_step", "seed", "global_batch", "quotas", "dataset_sizes"}  # O(#datasets)
    with pytest.raises(MegadiffError, match="0 of the 8 rows"):
        GlobalBatchLoader([dsa, dsb], [100.0, 1.0], 8, 4, 0, 1, seed=1)
    with pytest.raises(MegadiffError, match="multiple of micro_batch x dp_size"):
        GlobalBatchLoader([dsa], None, 10, 4, 0, 1)


def test_mixture_of_incompatible_datasets_fails(ds_dir, tmp_path):
    other = make_ds(tmp_path / "v", 20, vocab=70000)
    with pytest.raises(MegadiffError, match="differ in seq_len/vocab"):
        GlobalBatchLoader([ShardDataset(ds_dir), ShardDataset(other)], None, 4, 4)
    assert ShardDataset(other).info.dtype == "uint32"


def test_check_compat_names_file_and_fix(ds_dir):
    info = ShardDataset(ds_dir).info
    check_compat(info, vocab_size=VOCAB, mask_id=0, tokenizer_sha256=info.tokenizer_sha256)
    with pytest.raises(MegadiffError, match=r"manifest.json.*vocab of 5000.*model.vocab_size=5000"):
        check_compat(info, vocab_size=4999)
    with pytest.raises(MegadiffError, match=r"\[MASK\] id is 0"):
        check_compat(info, mask_id=3)
    with pytest.raises(MegadiffError, match=r"tokenizer-.*\.json.*re-tokenize"):
        check_compat(info, tokenizer_sha256="0" * 64)


@pytest.fixture
def copy_ds(ds_dir, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ds_dir, dst)
    return dst


def test_missing_shard(copy_ds):
    (copy_ds / "train-000002.tar").unlink()
    with pytest.raises(MegadiffError, match=r"train-000002\.tar: shard missing.*megadiff data tokenize"):
        ShardDataset(copy_ds)
    ds = ShardDataset(copy_ds, skip_corrupt=True)
    got = [int(ds[i][0]) for i in range(50)]
    assert ds.skipped == 7 and got[14:21] == [31] * 7  # samples 14..20 lived there; the next one stands in


def test_truncated_shard(copy_ds, caplog):
    f = copy_ds / "train-000001.tar"
    data = f.read_bytes()
    f.write_bytes(data[: 512 * 3])  # 1024 bytes per member: keeps sample 0 and the tar header of sample 1
    with pytest.raises(MegadiffError, match=r"train-000001\.tar: .* bytes but the manifest says .*truncated"):
        ShardDataset(copy_ds)
    ds = ShardDataset(copy_ds, skip_corrupt=True)
    assert int(ds[7][0]) == 17  # sample 0 of that shard is intact
    with caplog.at_level(logging.WARNING, logger="megadiff.data"):
        assert int(ds[8][0]) == 24  # samples 8..13 are gone -> next readable is 14 (base 10)
    assert ds.skipped == 6 and "train-000001.tar: sample 1" in caplog.text


def test_corrupt_shard_and_checksum(copy_ds):
    f = copy_ds / "train-000003.tar"
    data = bytearray(f.read_bytes())
    data[512 * 3 + 10] ^= 0xFF  # inside sample 1's .npy header (1024 bytes per member: tar header, payload)
    data[512 * 5 + 128 + 2] ^= 0x01  # low bit of a token of sample 2: still in the vocab, only the checksum can tell
    f.write_bytes(bytes(data))
    ds = ShardDataset(copy_ds)  # sizes match: opens
    assert int(ds[21][0]) == 31
    with pytest.raises(MegadiffError, match=r"train-000003\.tar: sample 1 \(train-000003-000001\.npy\) is unreadable"):
        ds[22]
    with pytest.raises(MegadiffError, match=r"train-000003\.tar: sha256 differs"):
        ShardDataset(copy_ds, verify=True)
    assert any("train-000003.tar: sha256 differs" in p for p in verify_dir(copy_ds))
    ds = ShardDataset(copy_ds, skip_corrupt=True)
    assert int(ds[22][0]) == 33 and ds.skipped == 1


def test_corrupt_tar_header_and_out_of_vocab(copy_ds):
    f = copy_ds / "train-000004.tar"
    data = bytearray(f.read_bytes())
    data[512 * 4 : 512 * 4 + 100] = b"\x07" * 100  # tar header of sample 2 is garbage
    f.write_bytes(bytes(data))
    ds = ShardDataset(copy_ds, skip_corrupt=True)
    assert [int(ds[i][0]) for i in (28, 29, 30)] == [38, 39, 45]  # members 2.. unreadable, shard 5 starts at 35
    assert ds.skipped == 5


def test_bad_manifest(copy_ds):
    mf = copy_ds / "manifest.json"
    m = json.loads(mf.read_text())
    m["version"] = 99
    mf.write_text(json.dumps(m))
    with pytest.raises(MegadiffError, match="format version 99 is not supported"):
        ShardDataset(copy_ds)
    del m["seq_len"]
    m["version"] = 1
    mf.write_text(json.dumps(m))
    with pytest.raises(MegadiffError, match="missing key 'seq_len'"):
        ShardDataset(copy_ds)
    mf.write_text("{not json")
    with pytest.raises(MegadiffError, match="not valid JSON"):
        ShardDataset(copy_ds)
    mf.unlink()
    with pytest.raises(MegadiffError, match="the pipeline did not finish"):
        ShardDataset(copy_ds)
    with pytest.raises(MegadiffError, match="manifest.json not found"):
        ShardDataset(copy_ds / "nowhere")


def test_tokenizer_copy_missing_or_changed(copy_ds):
    from megadiff.data.tokenizer import load_from_dir

    tok = next(copy_ds.glob("tokenizer-*.json"))
    tok.write_text(tok.read_text().replace("t5", "t5x"))
    with pytest.raises(MegadiffError, match=r"tokenizer-.*sha256 differs"):
        load_from_dir(copy_ds)
    with pytest.raises(MegadiffError, match=r"tokenizer-.*sha256 differs"):
        ShardDataset(copy_ds, verify=True)
    tok.unlink()
    with pytest.raises(MegadiffError, match="tokenizer copy.*missing"):
        ShardDataset(copy_ds)


def test_describe(ds_dir):
    text = describe(ds_dir)
    assert "vocab_size 5,000" in text and "train" in text and "mask 0" in text


def test_segment_ids_from_recorded_document_starts(tmp_path):
    """Format v2: micro batches carry segment_ids (document index within the sample) from the
    document-starts files; a version-1 dataset (no starts) reads as before, without the key."""
    import torch

    tok = toy_tokenizer(64)
    rng = np.random.default_rng(3)
    arr = rng.integers(4, 300, size=(10, L))
    starts = [np.unique(np.concatenate([[0], rng.choice(np.arange(1, L), k, replace=False)])) for k in rng.integers(0, 4, 10)]
    write_dataset(tmp_path / "v2", {"train": arr}, to_bytes(tok), special_ids(tok), 300, 4, starts={"train": starts})
    ds = ShardDataset(tmp_path / "v2")
    assert ds.has_segments and read_manifest(tmp_path / "v2")["version"] == 2 and verify_dir(tmp_path / "v2") == []
    for i in range(10):
        want = np.zeros(L, dtype=np.int64)
        for s in starts[i][1:]:
            want[s:] += 1
        assert np.array_equal(ds.segment_ids(i), want)
    ld = GlobalBatchLoader([ds], None, 4, 2, seed=1)
    for mb in ld.next_global():
        assert mb["segment_ids"].dtype == torch.int64 and mb["segment_ids"].shape == mb["tokens"].shape == (2, L)
        for row, sid in zip(mb["tokens"], mb["segment_ids"]):
            i = int(np.flatnonzero((arr == row.numpy()).all(1))[0])
            assert np.array_equal(sid.numpy(), ds.segment_ids(i))

    write_dataset(tmp_path / "v1", {"train": arr}, to_bytes(tok), special_ids(tok), 300, 4)
    mf = tmp_path / "v1" / "manifest.json"
    mf.write_text(json.dumps({**json.loads(mf.read_text()), "version": 1}))
    old = ShardDataset(tmp_path / "v1")
    assert not old.has_segments and np.array_equal(old.get_batch(range(10)), arr)
    assert [sorted(mb) for mb in GlobalBatchLoader([old], None, 4, 2, seed=1).next_global()] == [
        ["sample_ids", "tokens"]] * 2
    with pytest.raises(MegadiffError, match="records no document starts"):
        old.segment_ids(0)
    (tmp_path / "v2" / "train-000001.docs.npy").unlink()
    with pytest.raises(MegadiffError, match=r"train-000001\.docs\.npy: shard missing"):
        ShardDataset(tmp_path / "v2")


def test_unique_token_prefix_keeps_segment_ids(tmp_path):
    """data.unique_tokens wraps the dataset (PrefixDataset): its micro batches still carry the
    segment ids of the samples they hold."""
    from megadiff.data.loader import limit_unique_tokens

    tok = toy_tokenizer(64)
    rng = np.random.default_rng(4)
    arr = rng.integers(4, 300, size=(12, L))
    arr[:, 0] = np.arange(12) + 4  # sample identity
    starts = [np.arange(0, L, 1 + i % 5) for i in range(12)]
    write_dataset(tmp_path, {"train": arr}, to_bytes(tok), special_ids(tok), 300, 5, starts={"train": starts})
    (pre,) = limit_unique_tokens([ShardDataset(tmp_path)], 6 * L, seed=0)
    ld = GlobalBatchLoader([pre], None, 6, 3, seed=0)
    assert ld.has_segments
    for mb in ld.next_global():
        for row, sid in zip(mb["tokens"], mb["segment_ids"]):
            i = int(row[0]) - 4
            assert np.array_equal(sid.numpy(), np.cumsum(np.isin(np.arange(L), starts[i][1:])))
