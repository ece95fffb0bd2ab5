"""Run a benchmark: resumable prediction cache, progress bar, data parallelism, metrics, reports.

The harness is model-agnostic: it calls `predict(samples) -> responses`, one predictor per worker.

* Cache: every finished sample is appended (and flushed) to `workdir/predictions.<process>.jsonl` as
  {"id", "response"} (or {"id", "error"}), so an interrupted run resumes where it stopped; samples
  that failed are retried on resume. `workdir/run_config.json` records the settings of the run and
  a resume with different settings is refused (predictions would mix).
* Data parallelism: samples are split across processes (`process_index::process_count`, each process
  writing its own cache file to the shared workdir); within a process, one worker thread per
  predictor (e.g. one model replica per local device) pulls batches from a shared queue.
* Metrics: a response is parsed and graded by `tasks.score` when the report is built, so cached runs
  are re-graded by the current parser. Accuracy is reported over all samples ("micro"), per category
  of every grouping, and as the mean over the main grouping's categories ("macro").
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import tqdm

from videonsa_jax.evaluation import tasks as tasks_lib

Predictor = Callable[[Sequence[tasks_lib.Sample]], Sequence[str]]


class PredictionCache:
    """Append-only JSONL of finished samples; thread-safe."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self.records = _read_records(path) if os.path.exists(path) else {}

    def done(self, sample_id: str) -> bool:
        return "response" in self.records.get(sample_id, {})

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.records[record["id"]] = record
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


def _read_records(path: str) -> dict[str, dict[str, Any]]:
    records = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # A line cut by an interruption.
            records[record["id"]] = record
    return records


def check_run_config(workdir: str, run_config: dict[str, Any]) -> None:
    """Writes `run_config.json`, or checks that a resumed run uses the same settings."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "run_config.json")
    normalized = json.loads(json.dumps(run_config, sort_keys=True, default=str))
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != normalized:
            changed = sorted(
                k for k in set(previous) | set(normalized) if previous.get(k) != normalized.get(k)
            )
            raise ValueError(
                f"{workdir} holds predictions of a run with other settings (changed: {changed}). "
                "Use another workdir, or delete it to start over."
            )
        return
    with open(path, "w") as f:
        json.dump(normalized, f, indent=2, sort_keys=True)


def predict_all(
    samples: Sequence[tasks_lib.Sample],
    predictors: Sequence[Predictor],
    cache: PredictionCache,
    *,
    batch_size: int = 1,
    progress: bool = True,
    description: str = "eval",
) -> None:
    """Predicts every sample not in the cache; one worker thread per predictor.

    A batch whose prediction raises is retried one sample at a time, and a sample that still fails
    is recorded with its error (and retried on the next run).
    """
    todo = [s for s in samples if not cache.done(s.id)]
    batches: queue.Queue = queue.Queue()
    for i in range(0, len(todo), batch_size):
        batches.put(todo[i : i + batch_size])
    bar = tqdm.tqdm(
        total=len(samples),
        initial=len(samples) - len(todo),
        desc=description,
        disable=not progress,
        dynamic_ncols=True,
    )
    bar_lock = threading.Lock()
    errors: list[BaseException] = []

    def run_batch(predict: Predictor, batch: list[tasks_lib.Sample]) -> None:
        try:
            responses = list(predict(batch))
            if len(responses) != len(batch):
                raise ValueError(f"predictor returned {len(responses)} for {len(batch)} samples")
            records = [{"id": s.id, "response": r} for s, r in zip(batch, responses, strict=True)]
        except Exception as e:  # noqa: BLE001 - a bad sample must not stop the run.
            if len(batch) > 1:
                for sample in batch:
                    run_batch(predict, [sample])
                return
            records = [{"id": batch[0].id, "error": f"{type(e).__name__}: {e}"}]
        for record in records:
            cache.add(record)
        with bar_lock:
            bar.update(len(records))

    def worker(predict: Predictor) -> None:
        try:
            while True:
                try:
                    batch = batches.get_nowait()
                except queue.Empty:
                    return
                run_batch(predict, batch)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread.
            errors.append(e)

    if len(predictors) == 1:
        worker(predictors[0])
    else:
        threads = [threading.Thread(target=worker, args=(p,), daemon=True) for p in predictors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    bar.close()
    if errors:
        raise errors[0]


@dataclasses.dataclass(frozen=True)
class GradedSample:
    sample: tasks_lib.Sample
    response: str | None
    pred: str | None
    score: float
    error: str | None = None


def grade(
    samples: Sequence[tasks_lib.Sample], records: dict[str, dict[str, Any]]
) -> list[GradedSample]:
    """Grades the cached responses; a sample without a response scores 0 (with its error)."""
    graded = []
    for sample in samples:
        record = records.get(sample.id, {})
        if "response" in record:
            pred, value = tasks_lib.score(sample, record["response"])
            graded.append(GradedSample(sample, record["response"], pred, value))
        else:
            graded.append(GradedSample(sample, None, None, 0.0, record.get("error", "missing")))
    return graded


def metrics(graded: Sequence[GradedSample]) -> dict[str, Any]:
    """{"n", "micro", "macro", "groups": {grouping: {category: {"n", "acc"}}}, "errors"}.

    micro: mean score over samples; macro: mean over the categories of the first grouping.
    Scores are fractions in [0, 1].
    """
    by_group: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for g in graded:
        for grouping, category in g.sample.groups.items():
            by_group[grouping][category].append(g.score)
    groups = {
        grouping: {
            category: {"n": len(scores), "acc": sum(scores) / len(scores)}
            for category, scores in sorted(categories.items())
        }
        for grouping, categories in by_group.items()
    }
    main = next(iter(groups.values()), {})
    n = len(graded)
    return {
        "n": n,
        "micro": sum(g.score for g in graded) / n if n else 0.0,
        "macro": sum(c["acc"] for c in main.values()) / len(main) if main else 0.0,
        "groups": groups,
        "errors": {g.sample.id: g.error for g in graded if g.error},
        "unparsed": sum(g.response is not None and g.pred is None for g in graded),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with 2 decimals."""

    def cell(x: Any) -> str:
        return f"{x:.2f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_report(task: tasks_lib.Task, result: dict[str, Any]) -> str:
    """Headline, overall numbers and one table per grouping (accuracy in %)."""
    headline = result[task.headline]
    parts = [
        f"# {task.name}\n",
        f"**{100 * headline:.2f}** ({task.headline} average; micro {100 * result['micro']:.2f}, "
        f"macro {100 * result['macro']:.2f}; {result['n']} samples, {len(result['errors'])} "
        f"failed, {result['unparsed']} unparsed)\n",
    ]
    for grouping, categories in result["groups"].items():
        rows = [(c, v["n"], 100 * v["acc"]) for c, v in categories.items()]
        parts.append(f"\n## by {grouping}\n\n" + markdown_table([grouping, "n", "acc (%)"], rows))
    return "".join(parts)


def evaluate(
    task: tasks_lib.Task,
    samples: Sequence[tasks_lib.Sample],
    predictors: Sequence[Predictor],
    workdir: str,
    *,
    run_config: dict[str, Any] | None = None,
    batch_size: int = 1,
    progress: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Predicts (resuming from the cache), then writes results.json / results.md / samples.jsonl.

    With several processes, each predicts its share and `barrier()` (e.g. a multihost sync) is
    called before process 0 reads every process's cache from the shared workdir and writes the
    reports; other processes return None.
    """
    check_run_config(workdir, {"task": task.name, **(run_config or {})})
    cache = PredictionCache(os.path.join(workdir, f"predictions.{process_index}.jsonl"))
    predict_all(
        samples[process_index::process_count],
        predictors,
        cache,
        batch_size=batch_size,
        progress=progress,
        description=task.name,
    )
    if barrier is not None:
        barrier()
    if process_index != 0:
        return None
    records: dict[str, dict[str, Any]] = {}
    for name in sorted(os.listdir(workdir)):
        if name.startswith("predictions.") and name.endswith(".jsonl"):
            for sample_id, record in _read_records(os.path.join(workdir, name)).items():
                if "response" in record or sample_id not in records:
                    records[sample_id] = record
    graded = grade(samples, records)
    result = {"task": task.name, "headline": task.headline, **metrics(graded)}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown_report(task, result))
    with open(os.path.join(workdir, "samples.jsonl"), "w") as f:
        for g in graded:
            row = {
                "id": g.sample.id,
                "category": g.sample.category,
                "answer": g.sample.answer,
                "pred": g.pred,
                "score": g.score,
                "response": g.response,
                "error": g.error,
            }
            f.write(json.dumps(row) + "\n")
    return result
