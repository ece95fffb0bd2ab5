"""MLVU dev multiple-choice tasks (the `json/` directory; 3 min to 2 h videos).

Point `annotations` / `video_dir` at the downloaded benchmark (see `videonsa_jax.evaluation.tasks`
for the formats read). VideoNSA's per-benchmark fps / frame / pixel settings are not published;
these defaults keep prompts well under the 36K-token training context.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "mlvu"
    config.annotations = "data/mlvu/json"
    config.video_dir = "data/mlvu/video"
    config.workdir = "/tmp/videonsa_eval/mlvu"
    # Frame sampling and pixels per frame (VideoNSA evaluation: min_pixels = 256 * 28 * 28; the
    # processor's fps is left at 2.0, so the M-RoPE time step is 1.0 s per temporal patch).
    config.fps = 1.0
    config.max_frames = 256
    config.min_pixels = 256 * 28 * 28
    config.max_pixels = 256 * 28 * 28
    config.processor_fps = 2.0
    # Model: attention kind (None = as the checkpoint says) and NSA budget (None = checkpoint's).
    config.attention = placeholder(str)
    config.block_count = placeholder(int)
    config.window_size = placeholder(int)
    config.dtype = "bfloat16"
    # Decoding: greedy; max_new_tokens None = the task's (see tasks.TASKS).
    config.max_new_tokens = placeholder(int)
    # Runtime: samples per generate call per device, prompt-length bucket (fewer compilations),
    # devices used (0 = all local devices), samples evaluated (0 = all).
    config.batch_size = 1
    config.length_multiple = 256
    config.num_devices = 0
    config.limit = 0
    return config
