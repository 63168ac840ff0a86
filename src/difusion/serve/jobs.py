"""The queue in front of a model: a few generations at a time, a bounded wait, cancellation
when the client leaves, a time limit, and each step's preview for whoever watches."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL import Image

from .codec import b64, encode
from .errors import APIError
from .models import Generation, ServedModel

JOB_IDS = itertools.count(1)
POLL_SECONDS = 1.0  # how often a waiting request checks that its client is still there


class Stopped(Exception):
    """Raised inside a running generation to end it between two steps."""


@dataclass
class Job:
    """One generation: its request, where it stands, and how it ended."""

    request: Generation
    id: int = field(default_factory=lambda: next(JOB_IDS))
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total: int = 0
    x0: object = None  # the latest step's x0 estimate (a tensor), previewed on demand
    future: Future | None = None  # where it runs
    stop_reason: str | None = None  # set from outside: cancelled, interrupted, timeout, shutdown
    partial: list | None = None  # an interrupted job's images, as far as it got
    listeners: list[Callable[[str, dict], None]] = field(default_factory=list)
    on_stop: list[Callable[[str], None]] = field(default_factory=list)  # told when it stops

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            for tell in self.on_stop:
                tell(reason)

    def emit(self, event: str, data: dict) -> None:
        for listener in self.listeners:
            listener(event, data)

    @property
    def timings(self) -> str:
        queued = (self.started or self.finished or time.monotonic()) - self.submitted
        ran = (self.finished or time.monotonic()) - self.started if self.started else 0.0
        return f"queue {queued:.2f}s, generate {ran:.2f}s"


class Worker:
    """Runs one model's jobs, `concurrency` at a time in threads, with at most `queue_size`
    waiting; past that, submit() answers 429 with a Retry-After estimate."""

    def __init__(
        self, model: ServedModel, concurrency: int = 1, queue_size: int = 8, timeout: float = 300
    ) -> None:
        self.model, self.concurrency, self.queue_size, self.timeout = (
            model, concurrency, queue_size, timeout,
        )  # fmt: skip
        self.pending: list[Job] = []  # submitted, not finished: running ones first
        self.lock = threading.Lock()
        self.seconds_per_job: float | None = None  # a running mean, for Retry-After
        self.last: Job | None = None
        self.closing = False  # the server is stopping: no new job

    @property
    def running(self) -> list[Job]:
        return [j for j in self.pending if j.started is not None and j.finished is None]

    def position(self, job: Job) -> int:
        """Jobs that will start before this one."""
        with self.lock:
            waiting = [j for j in self.pending if j.started is None]
            return waiting.index(job) if job in waiting else 0

    def submit(self, job: Job) -> Future:
        with self.lock:
            if self.closing:
                raise APIError(503, "the server is shutting down")
            if len(self.pending) >= self.concurrency + self.queue_size:
                wait = max(1, min(round(self.retry_after()), round(self.timeout)))
                raise APIError(
                    429,
                    f"the queue is full ({self.queue_size} waiting); retry in about {wait} s",
                    headers={"Retry-After": str(wait)},
                )
            self.pending.append(job)
            job.future = self.model.executor.submit(self._run, job)
        job.future.add_done_callback(lambda f: self._done(job))
        return job.future

    def retry_after(self) -> float:
        """Seconds until a place frees: until the running job nearest its end ends, by its
        own pace so far (or, before its first step, the mean of the jobs before it)."""
        now, ends = time.monotonic(), []
        for job in self.running:
            ran = now - job.started
            if job.step:
                ends.append(ran * (job.total - job.step) / job.step)
            elif self.seconds_per_job is not None:
                ends.append(max(0.0, self.seconds_per_job - ran))
            else:
                ends.append(ran)  # nothing measured yet: at least as long again
        return min(ends) if ends else (self.seconds_per_job or 1.0)

    def _done(self, job: Job) -> None:
        with self.lock:
            if job in self.pending:
                self.pending.remove(job)

    def _run(self, job: Job) -> list[Image.Image]:
        job.started = time.monotonic()
        self.last = job
        g = job.request
        try:
            job.emit("start", {
                "job": job.id, "steps": self.model.steps_run(g), "seed": g.seed,
                "width": g.width, "height": g.height,
            })  # fmt: skip

            def on_step(i: int, total: int, x0) -> None:
                self._check(job)
                job.step, job.total = i, total
                job.x0 = x0
                if job.listeners:  # a stream: every step's picture; else only when asked
                    job.emit("progress", {"step": i, "total": total, "preview": self.preview(job)})

            self._check(job)
            images = self.model.generate(g, on_step)
            self._check(job)
            return images
        except Stopped:
            if job.stop_reason == "interrupted" and job.x0 is not None:
                job.partial = self.model.finish(job.x0)
            raise
        finally:
            job.finished = time.monotonic()
            ran = job.finished - job.started
            mean = self.seconds_per_job
            self.seconds_per_job = ran if mean is None else 0.8 * mean + 0.2 * ran

    def _check(self, job: Job) -> None:
        if job.stop_reason is None and time.monotonic() - job.started > self.timeout:
            job.stop("timeout")
        if job.stop_reason is not None:
            raise Stopped(job.stop_reason)

    def stop_error(self, job: Job) -> APIError:
        if job.stop_reason == "timeout":
            return APIError(
                504, f"the generation ran past the server's limit of {self.timeout:g} s and was "
                "cancelled; ask for fewer steps or images",
            )  # fmt: skip
        if job.stop_reason == "shutdown":
            return APIError(503, "the server is shutting down; the generation was cancelled")
        return APIError(409, f"the generation was {job.stop_reason}")

    def progress(self) -> dict:
        """AUTOMATIC1111's /sdapi/v1/progress for this model."""
        job = (self.running or [self.last])[0] if (self.running or self.last) else None
        active = job is not None and job.finished is None
        fraction = job.step / job.total if active and job.total else 0.0
        eta = 0.0
        if active and job.step and job.started is not None:
            eta = (time.monotonic() - job.started) * (job.total - job.step) / job.step
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "skipped": False,
                "interrupted": bool(job and job.stop_reason == "interrupted"),
                "job": f"job {job.id}" if active else "",
                "job_count": len(self.pending),
                "job_timestamp": "",
                "job_no": 0,
                "sampling_step": job.step if active else 0,
                "sampling_steps": job.total if active else 0,
            },
            "current_image": b64(self.preview(job)) if active and job.x0 is not None else None,
            "textinfo": f"step {job.step} of {job.total}" if active else None,
        }

    def preview(self, job: Job) -> bytes:
        """The job's latest x0 estimate as a PNG."""
        return encode(self.model.preview(job.x0))

    def shut_down(self) -> None:
        """Stop every job now (the running one at its next step, the queued ones before they
        start), answered 503, and take no new one."""
        with self.lock:
            self.closing = True
            jobs = list(self.pending)
        for job in jobs:  # outside the lock: a cancelled future's callback takes it
            job.stop("shutdown")
            if job.started is None and job.future is not None:
                job.future.cancel()

    def close(self) -> None:
        """Stop every job and wait for the threads (the app's shutdown); a later submit
        starts afresh, as an app started again expects."""
        with self.lock:
            for job in self.pending:
                job.stop("cancelled")
        executor, self.model.executor = self.model.executor, self.model.new_executor()
        executor.shutdown(wait=True, cancel_futures=True)


async def wait_for(
    worker: Worker,
    job: Job,
    future: Future,
    disconnected: Callable | None = None,
    partial_ok: bool = False,
) -> list[Image.Image]:
    """The job's images; stops the job if the awaiting task is cancelled or, polled every
    POLL_SECONDS, `disconnected()` turns true (the client left). `partial_ok`: an
    interrupted job's images as far as it got, where it made a step."""  # fmt: skip
    wrapped = asyncio.wrap_future(future)
    loop, shutdown = asyncio.get_running_loop(), asyncio.Event()
    job.on_stop.append(  # a stop answers now, not at the running step's end
        lambda reason: reason == "shutdown" and loop.call_soon_threadsafe(shutdown.set)
    )
    stopping = asyncio.ensure_future(shutdown.wait())
    try:
        while True:
            done, _ = await asyncio.wait(
                {wrapped, stopping}, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            if stopping in done:
                raise worker.stop_error(job)
            if done:
                break
            if disconnected is not None and await disconnected():
                job.stop("cancelled")
                future.cancel()
                raise APIError(499, "the client closed the connection")
        if future.cancelled():  # taken off the queue before it started (a shutdown)
            raise worker.stop_error(job)
        return wrapped.result()
    except Stopped:
        if partial_ok and job.partial is not None:
            return job.partial
        raise worker.stop_error(job) from None
    except ValueError as e:  # what the pipeline itself refuses
        raise APIError(422, str(e)) from None
    finally:
        stopping.cancel()
        abandon(job, future, wrapped)


def abandon(job: Job, future: Future, wrapped: asyncio.Future | None = None) -> None:
    """Stop a job nobody waits for any more (and read the end of its asyncio wrapper, which
    would otherwise be logged as an exception never retrieved)."""
    if not future.done():
        job.stop("cancelled")
        future.cancel()
    if wrapped is not None:
        wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())
