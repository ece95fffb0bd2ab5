"""A tensorflow-datasets builder that stores video bytes + QA as ArrayRecord.

Build (no TensorFlow needed):
  build_tfds({'train': 'needle.jsonl'}, data_dir)
Read (no TensorFlow needed): `TfdsSource(data_dir, 'train')`, a random-access sequence of
record dicts in the JSONL schema with "video" holding the encoded video bytes, usable as a
grain source. Each stored example has features
  video: bytes (the encoded file), id: text, record: text (the JSONL row minus "video").
"""

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from videonsa_jax.data import jsonl as jsonl_lib


class VideoQaBuilder(tfds.core.GeneratorBasedBuilder):
    """Video question answering from LLaVA-Video-style JSONL files."""

    name = "videonsa_video_qa"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Video bytes + JSON record."}
    # tfds derives this from the module through importlib_resources, which is not a
    # dependency here; the builder has no checksums file, so point at this file directly.
    code_path = epath.Path(__file__)

    def __init__(
        self, *, splits: Mapping[str, str] | None = None, media_root: str | None = None, **kwargs
    ):
        """splits: split name -> JSONL path (only needed to build)."""
        self._splits = dict(splits or {})
        self._media_root = media_root
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "id": tfds.features.Text(),
                    "record": tfds.features.Text(),
                }
            ),
            description="LLaVA-Video-style video QA: encoded video bytes + JSON record.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self._splits:
            raise ValueError("VideoQaBuilder needs splits={name: jsonl_path} to build")
        return {name: self._generate_examples(path) for name, path in self._splits.items()}

    def _generate_examples(self, path: str):
        source = jsonl_lib.JsonlSource(path, self._media_root)
        for i in range(len(source)):
            record = source[i]
            with open(record.pop("video"), "rb") as f:
                video = f.read()
            key = str(record.get("id", i))
            yield key, {"video": video, "id": key, "record": json.dumps(record)}


def build_tfds(
    splits: Mapping[str, str], data_dir: str, *, media_root: str | None = None
) -> VideoQaBuilder:
    """Builds the ArrayRecord dataset under data_dir; returns the builder."""
    builder = VideoQaBuilder(
        splits=splits, media_root=media_root, data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare()
    return builder


class TfdsSource(Sequence):
    """Random-access records of a built split; "video" holds the encoded bytes."""

    def __init__(self, data_dir: str, split: str = "train"):
        self._data_dir, self._split = os.fspath(data_dir), split
        self._source = VideoQaBuilder(data_dir=self._data_dir).as_data_source()[split]

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        record = json.loads(example["record"])
        record["video"] = bytes(example["video"])
        return record

    def __getstate__(self):  # Reopen the files in grain worker processes.
        return {"data_dir": self._data_dir, "split": self._split}

    def __setstate__(self, state):
        self.__init__(state["data_dir"], state["split"])
