"""Micro-batching: requests that arrive together are scored in one call of the reward model.

One worker thread owns the model (no locking inside rewards, one model copy in memory). It takes the
oldest request, waits up to ``max_wait_s`` for more, and scores up to ``max_batch`` images at once; a
request larger than ``max_batch`` is scored alone, in chunks. Each caller gets its own slice back.

Requests are independent, so one must not fail another: when the model raises on a merged batch (an
input it cannot handle, e.g. RapidOCR on a legal 4096x1 PNG), each request of the batch is scored again
on its own, and only those that fail alone get the error. The retry costs one more pass over the
batch's other requests, and only when a call fails.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from flowgrpo_core.rewards.base import RewardOutput

log = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[Image.Image], Sequence[str], Sequence[dict]], RewardOutput]


class QueueFull(RuntimeError):
    """The server already holds as many images as it accepts; the client should retry later."""


class BatcherClosed(RuntimeError):
    """The server is shutting down."""


@dataclass
class _Job:
    images: Sequence[Image.Image]
    prompts: Sequence[str]
    metadata: Sequence[dict]
    future: Future = field(default_factory=Future)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class BatchStats:
    """Counters for ``/health``: requests submitted, images and batches scored, the largest batch,
    requests that failed, and failed batches that were scored again request by request."""

    requests: int = 0
    images: int = 0
    batches: int = 0
    largest_batch: int = 0
    failures: int = 0
    split_batches: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class MicroBatcher:
    """Merges concurrent score requests into batches of at most ``max_batch`` images."""

    def __init__(
        self, score_fn: ScoreFn, max_batch: int = 16, max_wait_s: float = 0.005, max_queued_images: int = 1024
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.score_fn = score_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queued_images = max_queued_images
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._queued_images = 0
        self._lock = threading.Lock()
        self._closed = False
        self._carry: _Job | None = None
        self._worker = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._worker.start()

    def submit(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> Future:
        """Queue one request; the future resolves to its RewardOutput (or the reward's exception)."""
        job = _Job(images, prompts, metadata)
        with self._lock:
            if self._closed:
                raise BatcherClosed("the reward server is shutting down")
            if self._queued_images + len(job) > self.max_queued_images:
                raise QueueFull(
                    f"{self._queued_images} images already queued (limit {self.max_queued_images})"
                )
            self._queued_images += len(job)
            self.stats.requests += 1
        self._queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work; jobs still queued fail with BatcherClosed."""
        with self._lock:
            self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)

    def _next_batch(self) -> list[_Job] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, size = [first], len(first)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # keep the stop signal for the loop
                break
            if size + len(job) > self.max_batch:
                self._carry = job  # first in line for the next batch, so order is kept
                break
            batch.append(job)
            size += len(job)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            self._score(batch)
            # not kept while waiting for the next request: the batch holds its decoded images
            del batch
        self._fail_pending()

    def _call(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        """The reward on any number of images, in model calls of at most ``max_batch``."""
        outputs = []
        for i in range(0, len(images), self.max_batch):
            chunk = images[i : i + self.max_batch]
            outputs.append(self.score_fn(chunk, prompts[i : i + len(chunk)], metadata[i : i + len(chunk)]))
            with self._lock:
                self.stats.largest_batch = max(self.stats.largest_batch, len(chunk))
        return concat_outputs(outputs)

    def _score(self, batch: list[_Job]) -> None:
        size = sum(len(job) for job in batch)
        try:
            results = self._score_jobs(batch)
        except BaseException as error:  # not an error of the model (KeyboardInterrupt...): fail them all
            results = [error] * len(batch)
        with self._lock:
            self._queued_images -= size
            self.stats.failures += sum(isinstance(r, BaseException) for r in results)
            scored = [len(job) for job, r in zip(batch, results) if not isinstance(r, BaseException)]
            if scored:
                self.stats.batches += 1
                self.stats.images += sum(scored)
        for job, result in zip(batch, results):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _score_jobs(self, batch: list[_Job]) -> list[RewardOutput | BaseException]:
        """Each job's output, or the exception that job alone makes the reward raise."""
        try:
            merged = self._call(
                [im for job in batch for im in job.images],
                [p for job in batch for p in job.prompts],
                [m for job in batch for m in job.metadata],
            )
        except Exception as error:
            if len(batch) == 1:
                return [error]
            log.warning(
                "reward failed on a batch of %d requests (%s: %s); scoring each request on its own",
                len(batch),
                type(error).__name__,
                str(error)[:200],
            )
            with self._lock:
                self.stats.split_batches += 1
            return [self._score_alone(job) for job in batch]
        results: list[RewardOutput | BaseException] = []
        start = 0
        for job in batch:
            results.append(slice_output(merged, start, start + len(job)))
            start += len(job)
        return results

    def _score_alone(self, job: _Job) -> RewardOutput | BaseException:
        try:
            return self._call(job.images, job.prompts, job.metadata)
        except Exception as error:
            return error

    def _fail_pending(self) -> None:
        pending = [self._carry] if self._carry else []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                pending.append(job)
        for job in pending:
            job.future.set_exception(BatcherClosed("the reward server is shutting down"))


def concat_outputs(outputs: list[RewardOutput]) -> RewardOutput:
    """Outputs of consecutive chunks as one; a detail missing from a chunk is None there."""
    if len(outputs) == 1:
        return outputs[0]
    keys = list(dict.fromkeys(key for out in outputs for key in out.details))
    details = {
        key: [v for out in outputs for v in out.details.get(key, [None] * len(out.scores))] for key in keys
    }
    return RewardOutput(scores=np.concatenate([out.scores for out in outputs]), details=details)


def slice_output(output: RewardOutput, start: int, stop: int) -> RewardOutput:
    return RewardOutput(
        scores=output.scores[start:stop],
        details={key: list(values[start:stop]) for key, values in output.details.items()},
    )
