"""Datasets (JSONL, tfds ArrayRecord), grain pipelines and synthetic video tasks."""

from videonsa_jax.data.jsonl import JsonlSource
from videonsa_jax.data.jsonl import read_jsonl
from videonsa_jax.data.pipeline import DataConfig
from videonsa_jax.data.pipeline import collate
from videonsa_jax.data.pipeline import make_dataset
from videonsa_jax.data.pipeline import process_record
from videonsa_jax.data.synthetic import generate_dataset
from videonsa_jax.data.synthetic import write_synthetic_tokenizer
