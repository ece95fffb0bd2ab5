"""Datasets (JSONL, tfds ArrayRecord), grain pipelines and synthetic video tasks."""

from videonsa_jax.data.jsonl import JsonlSource, read_jsonl
from videonsa_jax.data.pipeline import DataConfig, collate, make_dataset, process_record
from videonsa_jax.data.synthetic import generate_dataset, write_synthetic_tokenizer

__all__ = [
    "DataConfig",
    "JsonlSource",
    "collate",
    "generate_dataset",
    "make_dataset",
    "process_record",
    "read_jsonl",
    "write_synthetic_tokenizer",
]
