"""Disk writes off the critical path: device-to-host copies that do not block, and a background writer.

``to_host`` starts copying a pooled activation batch to the CPU and returns at once: on CUDA the copy goes
into a pinned buffer with ``non_blocking=True`` and a CUDA event marks its end, so the GPU keeps running the
next batch while the bytes travel. ``HostBatch.numpy()`` waits for that event only when the values are read.

``ShardWriter`` runs jobs (cast, hash and write one shard) on a single background thread, in submission
order, fed by a bounded queue: at most ``max_pending`` shards wait in memory, and ``submit`` blocks when the
queue is full, so memory stays bounded whatever the number of shards. An exception in a job is re-raised in
the caller at the next ``submit`` or at ``close``; later jobs are dropped. Jobs must write atomically (temp
file + rename, see ``_io.atomic_write_bytes``), so a failed job leaves no half-written shard.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch


class HostBatch:
    """A float32 ``[rows, d]`` batch on its way to (or already in) host memory."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None = None,
                 source: torch.Tensor | None = None):
        self._host = host
        self._event = event
        self._source = source  # keeps the device tensor alive until the copy has finished

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
            self._event, self._source = None, None
        return self._host.numpy()


def to_host(t: torch.Tensor) -> HostBatch:
    """Start copying tensor ``t`` to the CPU. Non-blocking (pinned buffer + CUDA event) on CUDA; on CPU as is."""
    import torch

    if t.device.type != "cuda":
        return HostBatch(t.detach().cpu())
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return HostBatch(host, event, t)


_STOP = object()


class ShardWriter:
    """One background thread running submitted jobs in order, with a bounded queue (see module doc).

    Use as a context manager: leaving the block waits for every queued job (shards already computed are
    kept for a resume) and re-raises a job's error, unless the block itself raised.
    With ``threaded=False`` jobs run at once in the caller (the synchronous reference path).
    """

    def __init__(self, max_pending: int = 2, threaded: bool = True, name: str = "safetyneurons-shard-writer"):
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.threaded = threaded
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:  # after a failure, later jobs are dropped
                    job()
            except BaseException as e:  # handed to the caller
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (blocks while ``max_pending`` jobs wait). Re-raises an earlier job's error."""
        self._raise()
        if self._thread is None:
            job()
            return
        self._queue.put(job)

    def close(self) -> None:
        """Run every queued job, stop the thread, and re-raise the first job error."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # the caller failed: still finish the shards already computed (a resume keeps them), but let the
        # caller's exception through rather than a writer error
        try:
            self.close()
        except Exception:
            pass
