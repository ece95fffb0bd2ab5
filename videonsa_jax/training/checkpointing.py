"""One orbax CheckpointManager for the training state and the data iterator.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items: `state` (the `TrainState`: params,
optimizer state, step, non-finite counter; sharded arrays written by every process) and `data` (the
grain iterator state, one JSON file per process). Saves are asynchronous: the device arrays are
copied and written in a background thread while training goes on. `restore_latest` walks back
from the newest step: a checkpoint that fails to restore is moved to `<workdir>/corrupt_checkpoints`
with a warning (so later saves of that step do not collide) and the previous one is tried; if none
restores, the run stops rather than silently starting over.
Interrupted saves leave only temporary directories, which orbax ignores and cleans up.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Protocol

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored."""


class DataIterator(Protocol):
    """A checkpointable iterator (a grain `DatasetIterator` or anything with the same methods)."""

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


class _IteratorState:
    """The iterator's state taken when `save` is called, in the shape grain's handler expects.

    grain's handler serialises `item.get_state()` whenever orbax runs it, possibly after the loop
    has moved the real iterator on; a frozen copy makes the saved state that of the saved step.
    """

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    """Saves at multiples of `save_every` (and when forced), keeps the newest `keep`."""

    def __init__(self, directory: str, *, save_every: int, keep: int, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        self._corrupt_dir = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        self._save_every = save_every
        self._last_saved = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=asynchronous,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def save(self, step: int, state: Any, data_iter: DataIterator, *, force: bool = False) -> bool:
        """Starts saving `state` and the iterator position at `step` if due (or forced)."""
        if step == self._last_saved or not (force or step % self._save_every == 0):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorState(data_iter.get_state())),
        )
        saved = self._manager.save(step, args=args, force=True)
        if saved:
            self._last_saved = step
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def reached_preemption(self, step: int) -> bool:
        """True once JAX's multi-process preemption notice (e.g. SIGTERM on a pod) is agreed on."""
        return self._manager.reached_preemption(step)

    def restore_latest(
        self, abstract_state: Any, data_iter: DataIterator
    ) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint into `abstract_state`'s shapes and shardings.

        Returns (state, step), or None when there is no checkpoint; the iterator is moved to the
        saved position. Newer steps that failed are set aside only once an older one restores
        (so they are damaged, not from another config).

        Raises:
            CheckpointError: checkpoints exist but none restores (e.g. the model config changed).
        """
        failed = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(_IteratorState()),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable.
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logging.warning(
                    "checkpoint: step %d in %s cannot be restored (%s); falling back to the "
                    "previous checkpoint",
                    step,
                    self.directory,
                    reason,
                )
                failed.append((step, reason))
                continue
            for bad, _ in failed:
                self._set_aside(bad)
            data_iter.set_state(restored.data.state)
            logging.info("checkpoint: restored step %d from %s", step, self.directory)
            return restored.state, step
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored into this run's state "
                f"(does the config match the one that wrote them?); newest: step {failed[0][0]}: "
                f"{failed[0][1]}"
            )
        return None

    def _set_aside(self, step: int) -> None:
        """Moves an unreadable step out of the checkpoint directory (process 0 does the move)."""
        if jax.process_index() == 0:
            os.makedirs(self._corrupt_dir, exist_ok=True)
            target = os.path.join(self._corrupt_dir, str(step))
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until a background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
