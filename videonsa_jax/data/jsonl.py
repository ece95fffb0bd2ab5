"""LLaVA-Video-style JSONL datasets.

One JSON object per line: {"video": path, "conversations": [{"from": "human", "value":
"<video>\\n..."}, {"from": "gpt", "value": ...}], ...}; optional "image" (a path or a list
of paths), "start"/"end" (seconds), "choices"/"answer"/"answer_index" (multiple choice),
"id", "task". Relative media paths resolve against `media_root` (default: the JSONL's
directory).
"""

import json
import os
from collections.abc import Sequence


def read_jsonl(path: str) -> list[dict]:
    """Parses a JSONL file (blank lines ignored)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _resolve(root: str, value):
    if isinstance(value, str):
        return value if os.path.isabs(value) else os.path.join(root, value)
    if isinstance(value, list):
        return [_resolve(root, v) for v in value]
    return value


class JsonlSource(Sequence):
    """Random-access records of one or more JSONL files, media paths made absolute."""

    def __init__(self, paths: str | Sequence[str], media_root: str | None = None):
        paths = [paths] if isinstance(paths, str) else list(paths)
        self._records = []
        for path in paths:
            root = media_root or os.path.dirname(os.path.abspath(path))
            for record in read_jsonl(path):
                for key in ("video", "image"):
                    if key in record:
                        record[key] = _resolve(root, record[key])
                self._records.append(record)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return dict(self._records[index])
