"""JSONL / tfds sources, record processing, collate and the grain pipeline (data/)."""

import json
import os
import shutil

import numpy as np
import pytest

from videonsa_jax.data import jsonl as jsonl_lib
from videonsa_jax.data import pipeline, synthetic, tfds_builder
from videonsa_jax.processing import chat

CFG = pipeline.DataConfig(
    max_length=160, bucket_lengths=(128, 160), fps=2.0, min_pixels=56 * 56, max_pixels=56 * 56
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    path = synthetic.generate_dataset(
        out, "needle", 10, num_frames=16, size=56, fps=2.0, seed=0, progress=False
    )
    synthetic.write_synthetic_tokenizer(out)
    return out, path, chat.load_tokenizer(out)


def _ids(batch):
    return batch["id"]


def test_jsonl_source_resolves_paths(data):
    out, path, _ = data
    src = jsonl_lib.JsonlSource(path)
    assert len(src) == 10
    assert src[0]["video"] == os.path.join(out, "videos", "needle_00000.mp4")
    src[0]["video"] = "mutated"
    assert src[0]["video"] != "mutated"  # records are copied out


def test_process_record_fields(data):
    _, path, tok = data
    record = jsonl_lib.JsonlSource(path)[0]
    e = pipeline.process_record(record, tok, CFG)
    assert e["video_grid_thw"].tolist() == [[8, 4, 4]]
    assert e["pixel_values_videos"].shape == (128, 1176)
    assert (e["input_ids"] == tok.special.video_pad).sum() == 32
    assert tok.decode(e["input_ids"][e["loss_mask"]], False) == record["answer"] + "<|im_end|>"
    assert e["answer_index"] == record["answer_index"]
    assert e["second_per_grid_ts"].tolist() == [1.0]


def test_eval_mode_drops_answer(data):
    _, path, tok = data
    record = jsonl_lib.JsonlSource(path)[0]
    e = pipeline.process_record(
        record, tok, pipeline.DataConfig(**{**CFG.__dict__, "train": False})
    )
    assert not e["loss_mask"].any()
    assert tok.decode(e["input_ids"], False).endswith(
        "D. yellow\nAnswer with the option's "
        "letter from the given choices directly."
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_overlong_reduces_frames_keeps_answer(data):
    _, path, tok = data
    record = jsonl_lib.JsonlSource(path)[0]
    full = pipeline.process_record(record, tok, CFG)
    limit = len(full["input_ids"]) - 9  # needs 3 fewer temporal groups (4 tokens each)
    e = pipeline.process_record(
        record, tok, pipeline.DataConfig(**{**CFG.__dict__, "max_length": limit})
    )
    assert len(e["input_ids"]) <= limit
    assert e["video_grid_thw"].tolist() == [[5, 4, 4]]  # 10 frames instead of 16
    assert tok.decode(e["input_ids"][e["loss_mask"]], False) == record["answer"] + "<|im_end|>"
    with pytest.raises(pipeline.SkipSample):  # text alone does not fit
        pipeline.process_record(
            record, tok, pipeline.DataConfig(**{**CFG.__dict__, "max_length": 40})
        )


def test_collate_padding_and_buckets():
    def example(n, n_videos):
        return {
            "input_ids": np.arange(1, n + 1, dtype=np.int32),
            "loss_mask": np.arange(n) >= n - 2,
            "pixel_values_videos": np.ones((16 * n_videos, 1176), np.float32) * n,
            "video_grid_thw": np.array([[2, 4, 8]] * n_videos),
            "second_per_grid_ts": np.ones(n_videos, np.float32),
            "pixel_values": np.zeros((0, 1176), np.float32),
            "image_grid_thw": np.zeros((0, 3), np.int64),
            "answer_index": -1,
            "choices": [],
            "id": str(n),
            "task": "",
        }

    batch = pipeline.collate(
        [example(5, 1), example(9, 2)],
        pad_id=7,
        max_length=64,
        bucket_lengths=(8, 16, 32),
        num_skipped=3,
    )
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, 5:].tolist() == [7] * 11
    assert batch["attention_mask"].sum(1).tolist() == [5, 9]
    assert batch["loss_mask"].sum(1).tolist() == [2, 2] and not batch["loss_mask"][0, 5:].any()
    assert batch["pixel_values_videos"].shape == (48, 1176)
    assert (
        batch["pixel_values_videos"][:16].max() == 5
        and batch["pixel_values_videos"][16:].min() == 9
    )
    assert batch["video_grid_thw"].shape == (3, 3) and batch["video_counts"].tolist() == [1, 2]
    assert batch["num_skipped"] == 3
    assert pipeline.collate([example(40, 0)], pad_id=0, max_length=64, bucket_lengths=(8, 16, 32))[
        "input_ids"
    ].shape == (1, 64)


def test_state_round_trip(data):
    _, path, tok = data
    ds = pipeline.make_dataset(
        jsonl_lib.JsonlSource(path), tok, CFG, batch_size=3, seed=5, shard_index=0, shard_count=1
    )
    it = iter(ds)
    first = [_ids(next(it)) for _ in range(4)]  # crosses the epoch boundary (10 records)
    assert sorted(sum(first[:3], []) + first[3][:1]) == sorted(f"needle_{i:05d}" for i in range(10))
    it = iter(ds)
    next(it)
    state = it.get_state()
    expected = next(it)
    resumed = iter(ds)
    resumed.set_state(json.loads(json.dumps(state)))  # states are JSON-serialisable
    got = next(resumed)
    assert got["id"] == expected["id"]
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["pixel_values_videos"], expected["pixel_values_videos"])
    other_seed = pipeline.make_dataset(
        jsonl_lib.JsonlSource(path), tok, CFG, batch_size=10, seed=6, shard_index=0, shard_count=1
    )
    assert next(iter(other_seed))["id"] != sum(first[:3], [])[:10]


def test_sharding_is_disjoint(data):
    _, path, tok = data
    seen = []
    for index in range(3):
        ds = pipeline.make_dataset(
            jsonl_lib.JsonlSource(path),
            tok,
            CFG,
            batch_size=2,
            shuffle=False,
            num_epochs=1,
            shard_index=index,
            shard_count=3,
        )
        seen.append([i for batch in ds for i in batch["id"]])
    assert sum(map(len, seen)) == 10
    assert len(set(sum(seen, []))) == 10


def test_bad_samples_are_skipped_and_counted(data, tmp_path):
    out, path, tok = data
    rows = [json.loads(line) for line in open(path)][:4]
    rows[1]["video"] = "does_not_exist.mp4"
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    rows[2]["video"] = str(tmp_path / "bad.mp4")
    rows.append({"id": "malformed", "video": rows[0]["video"]})  # no conversations
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = jsonl_lib.JsonlSource(str(bad), media_root=out)
    ds = pipeline.make_dataset(
        src, tok, CFG, batch_size=2, shuffle=False, num_epochs=1, shard_index=0, shard_count=1
    )
    it = iter(ds)
    batches = list(it)
    assert [b["id"] for b in batches] == [["needle_00000", "needle_00003"]]
    assert batches[0]["num_skipped"] == 2
    assert it.skipped_total == 3  # the trailing malformed record is counted too


def test_tfds_arrayrecord_source(data, tmp_path):
    out, path, tok = data
    small = tmp_path / "small.jsonl"
    small.write_text("".join(open(path).readlines()[:3]))
    shutil.copytree(os.path.join(out, "videos"), tmp_path / "videos")
    tfds_builder.build_tfds({"train": str(small)}, str(tmp_path / "tfds"))
    src = tfds_builder.TfdsSource(str(tmp_path / "tfds"), "train")
    assert len(src) == 3
    records = sorted((src[i] for i in range(3)), key=lambda r: r["id"])
    assert isinstance(records[0]["video"], bytes) and records[0]["id"] == "needle_00000"
    with open(tmp_path / "videos" / "needle_00000.mp4", "rb") as f:
        assert records[0]["video"] == f.read()
    from_bytes = pipeline.process_record(records[0], tok, CFG)
    from_path = pipeline.process_record(jsonl_lib.JsonlSource(path)[0], tok, CFG)
    np.testing.assert_array_equal(from_bytes["input_ids"], from_path["input_ids"])
    np.testing.assert_array_equal(
        from_bytes["pixel_values_videos"], from_path["pixel_values_videos"]
    )
    ds = pipeline.make_dataset(
        src, tok, CFG, batch_size=3, num_epochs=1, shard_index=0, shard_count=1
    )
    assert sorted(next(iter(ds))["id"]) == [f"needle_{i:05d}" for i in range(3)]


@pytest.mark.slow
def test_worker_processes(data):
    _, path, tok = data
    kwargs = dict(batch_size=2, seed=1, num_epochs=1, shard_index=0, shard_count=1)
    src = jsonl_lib.JsonlSource(path)
    serial = [b["id"] for b in pipeline.make_dataset(src, tok, CFG, **kwargs)]
    parallel = [b["id"] for b in pipeline.make_dataset(src, tok, CFG, worker_count=2, **kwargs)]
    assert sorted(sum(serial, [])) == sorted(sum(parallel, []))
