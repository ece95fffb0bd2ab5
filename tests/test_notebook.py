"""notebooks/inference.ipynb runs top to bottom (nbclient) on a tiny generated checkpoint."""

import os

import nbformat
import tiny_videonsa as T
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inference_notebook_executes(tmp_path, monkeypatch):
    video = T.write_tiny_video(str(tmp_path / "clip.mp4"))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "inference.ipynb"), as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = "\n".join(
        [
            'PACKAGE = "unused: videonsa_jax is importable"',
            f"MODEL = {T.shared_checkpoint()!r}",
            f"VIDEO = {video!r}",
            'QUESTION = "What moves?"',
            "FPS, MAX_FRAMES, MIN_PIXELS, MAX_PIXELS = 4.0, 8, 3136, 3136",
            'ATTENTION, DTYPE, MAX_NEW_TOKENS = "videonsa", "float32", 4',
        ]
    )
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "8 frames, grid (4, 4, 4)" in outputs
    assert "A: " in outputs and "| layer | compression | selection | sliding_window |" in outputs
    assert (tmp_path / "gates.png").exists()
