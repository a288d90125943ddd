# SPDX-License-Identifier: GPL-3.0-or-later
"""Activation shards: index, columns, checksums, resumable writing, streaming readers."""

import json
from collections import Counter

import pytest
import torch

from saemnesia_tools.training.shards import (
    INDEX_NAME, ActivationDataset, ShardError, ShardWriter, merge_parts, validation_mask,
)

VOCAB = {"object": ["Cats", "Dogs"], "style": ["Pop_Art"]}


def open_writer(root, **kw):
    return ShardWriter(root, d=4, height=2, width=3, label_vocab=VOCAB, hookpoint="unet.up_blocks.1.attentions.1",
                       model_id="tiny", source={"steps": 3}, **kw)


def sample_acts(sample_id, rows=3):
    """[rows, 6, 4]: every value encodes (sample, row) so order and duplicates are visible."""
    return torch.full((rows, 6, 4), float(sample_id)) + torch.arange(rows).view(rows, 1, 1) / 10


def write_samples(writer, ids):
    for i in ids:
        writer.write_sample(i, sample_acts(i), t=[1.0, 0.5, 0.0], timestep=[999, 500, 0], step=[0, 1, 2],
                            branch=[0, 0, 0], labels=[i % 2, -1 if i % 3 else 0])


def test_records_round_trip_with_their_columns(tmp_path):
    with open_writer(tmp_path, shard_mb=3 * 6 * 4 * 2 * 2 / 2**20) as w:  # two samples per shard
        write_samples(w, range(5))
    ds = ActivationDataset(tmp_path)
    assert ds.num_records == 15 and len(ds.shards) == 3 and ds.tokens_per_record == 6
    rows = [ds.load_shard(i) for i in range(3)]
    first = rows[0]
    assert first.acts.dtype == torch.float16 and first.acts.shape == (6, 6, 4)
    assert first.sample.tolist() == [0, 0, 0, 1, 1, 1]
    assert first.labels.tolist()[3] == [1, -1]
    assert first.t.tolist()[:3] == [1.0, 0.5, 0.0] and first.step.tolist()[:3] == [0, 1, 2]
    assert torch.allclose(first.acts[4].float(), sample_acts(1)[1], atol=2e-2)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["label_vocab"] == VOCAB and index["hookpoint"] == "unet.up_blocks.1.attentions.1"
    assert index["shards"][2]["samples"] == [[4, 5]]


def test_interrupted_collection_resumes_without_duplicate_rows(tmp_path):
    shard_mb = 3 * 6 * 4 * 2 * 2 / 2**20
    w = open_writer(tmp_path, shard_mb=shard_mb)
    write_samples(w, range(3))  # samples 0, 1 flushed; 2 only buffered -> lost by the "crash"
    del w
    w = open_writer(tmp_path, shard_mb=shard_mb)
    assert [w.is_complete(i) for i in range(4)] == [True, True, False, False]
    write_samples(w, [i for i in range(5) if not w.is_complete(i)])
    w.close()
    ds = ActivationDataset(tmp_path)
    samples = torch.cat([ds.load_shard(i).sample for i in range(len(ds.shards))])
    assert sorted(samples.tolist()) == [i for i in range(5) for _ in range(3)]


def test_resuming_with_different_settings_is_refused(tmp_path):
    open_writer(tmp_path).close()
    with pytest.raises(ShardError, match="source"):
        ShardWriter(tmp_path, d=4, height=2, width=3, label_vocab=VOCAB, hookpoint="unet.up_blocks.1.attentions.1",
                    model_id="tiny", source={"steps": 50})


def test_wrong_record_shape_or_duplicate_sample_is_refused(tmp_path):
    w = open_writer(tmp_path)
    write_samples(w, [0])
    with pytest.raises(ShardError):
        write_samples(w, [0])
    with pytest.raises(ShardError):
        w.write_sample(1, torch.zeros(1, 5, 4), t=[0], timestep=[0], step=[0], branch=[0], labels=[0, 0])


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_corrupt_shards_are_detected(tmp_path, damage):
    with open_writer(tmp_path) as w:
        write_samples(w, range(2))
    ds = ActivationDataset(tmp_path)
    path = tmp_path / ds.shards[0]["file"]
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":
        data[-3] ^= 0x01  # inside the acts payload: the file still parses, only the checksum catches it
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-10]))
    else:
        path.unlink()
    with pytest.raises(ShardError, match=ds.shards[0]["file"]):
        ds.verify_all()
    with pytest.raises(ShardError):
        list(ds.iter_tokens(4))


def test_token_stream_is_a_shuffled_permutation_that_never_repeats(tmp_path):
    with open_writer(tmp_path, shard_mb=3 * 6 * 4 * 2 / 2**20) as w:  # one sample per shard
        write_samples(w, range(6))
    ds = ActivationDataset(tmp_path)
    batches = list(ds.iter_tokens(8, seed=1, buffer_tokens=20))
    assert len(batches) == ds.steps_per_epoch(8) == 108 // 8
    stream = torch.cat(batches)[:, 0].float()
    every = torch.cat([ds.load_shard(i).acts.reshape(-1, 4) for i in range(6)])[:, 0].float()
    seen, available = Counter(stream.tolist()), Counter(every.tolist())
    assert all(seen[v] <= available[v] for v in seen)  # no token is emitted more often than it is stored
    assert stream.numel() == 104
    assert not torch.equal(stream, every[:104])  # shuffled
    again = torch.cat(list(ds.iter_tokens(8, seed=1, buffer_tokens=20)))
    other_epoch = torch.cat(list(ds.iter_tokens(8, seed=1, epoch=1, buffer_tokens=20)))
    assert torch.equal(torch.cat(batches), again) and not torch.equal(again, other_epoch)


def test_record_stream_filters_and_keeps_records_whole(tmp_path):
    with open_writer(tmp_path, shard_mb=3 * 6 * 4 * 2 / 2**20) as w:
        write_samples(w, range(10))
    ds = ActivationDataset(tmp_path)
    held_out = lambda b: validation_mask(b.sample, 0.3, seed=0)  # noqa: E731
    val = list(ds.iter_records(4, where=held_out))
    train = list(ds.iter_records(4, where=lambda b: ~held_out(b)))
    val_ids = set(torch.cat([b.sample for b in val]).tolist())
    train_ids = set(torch.cat([b.sample for b in train]).tolist())
    assert val_ids and train_ids and not (val_ids & train_ids) and val_ids | train_ids == set(range(10))
    for batch in train + val:
        for r in range(len(batch)):  # a record's tokens are its own sample's row
            expected = sample_acts(int(batch.sample[r]))[int(batch.step[r])]
            assert torch.allclose(batch.acts[r].float(), expected, atol=2e-2)


def test_parts_merge_into_one_dataset(tmp_path):
    for rank in range(2):
        with open_writer(tmp_path / f"part-{rank:03d}") as w:
            write_samples(w, range(rank, 6, 2))
    merge_parts(tmp_path, [tmp_path / "part-000", tmp_path / "part-001"])
    ds = ActivationDataset(tmp_path)
    assert ds.num_records == 18
    assert sorted(torch.cat([b.sample for b in ds.iter_records(5)]).tolist()) == [i for i in range(6) for _ in range(3)]
