"""A supervised pool of worker processes that run one CPU scorer each.

    pool = WorkerPool(ScorerSpec("reward_servers.math_answer:make_scorer"), workers=2)
    scores, sample_count = await pool.score(body, client_gone)  # in the server's event loop

Each worker is a "spawn"ed process (forking a process that runs uvicorn's threads is unsafe) that
builds its scorer once from a picklable ScorerSpec, then scores one batch at a time in its main
thread, where signal-based time limits work. A worker gets the raw request body and parses it
itself (scoring.score_request), so the server process only moves bytes. The pool, not the
worker, enforces the per-request time limit: a worker that runs past it, or dies, is killed and
replaced, its request gets WorkerLost (a retryable 503), and `ready` is False until the
replacement is up. Requests wait for a free worker in a bounded queue (PoolBusy beyond it).

Why not concurrent.futures.ProcessPoolExecutor: one dead worker breaks the whole executor for good
(BrokenProcessPool), and it cannot stop one running task. So each worker is a multiprocessing
Process with its own Pipe, driven from a thread per busy worker.
"""

import asyncio
import collections
import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from reward_servers.scoring import InvalidRequest, SampleError, score_request

logger = logging.getLogger("reward_servers")

STARTUP_SECONDS = 300  # a worker imports its scorer's libraries (or loads a reward file) in this time
# A pool whose replacement workers failed to start this many times in a row is not coming back by
# itself (a broken environment, no memory): `recoverable` turns False, so that a supervisor (Ray
# Serve's health check) replaces the whole server instead of waiting on it.
FAILED_STARTS_TO_GIVE_UP = 3
RETRY_START_SECONDS = 5  # between failed starts of a replacement worker
CLIENT_CHECK_SECONDS = 0.5  # how often a queued request checks that its client is still there


@dataclass(frozen=True)
class ScorerSpec:
    """What a worker calls to build its scorer: `factory` is "module:function", called with `args`."""

    factory: str
    args: tuple = field(default_factory=tuple)

    def build(self):
        module_name, function_name = self.factory.split(":")
        return getattr(importlib.import_module(module_name), function_name)(*self.args)


class PoolBusy(Exception):
    """Every worker is busy and the queue is full: answer 503 with Retry-After."""


class WorkerLost(Exception):
    """The worker scoring this request died or ran past the time limit and was replaced."""


class ClientGone(Exception):
    """The client disconnected while its request waited for a worker; the work was dropped."""


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


class WorkerPool:
    def __init__(self, spec: ScorerSpec, workers: int, request_timeout: float = 300.0, max_queue: int = 256):
        if workers < 1 or max_queue < 0 or not request_timeout > 0:
            raise ValueError(
                "need workers >= 1, max_queue >= 0 and request_timeout > 0, "
                f"got {workers}, {max_queue}, {request_timeout}"
            )
        self.spec = spec
        self.request_timeout = request_timeout
        self.max_queue = max_queue
        self._context = multiprocessing.get_context("spawn")
        # One thread per busy worker waits on its pipe, so the event loop never blocks.
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="scorer")
        self._idle = []
        self._waiters = collections.deque()  # futures of queued requests, first come first served
        self._replacing = 0
        self._failed_starts = 0  # replacement starts that failed since the last one that worked
        self._loop = None
        self._closed = False
        starting = [self._start_process() for _ in range(workers)]
        self._idle = [self._wait_ready(*started) for started in starting]

    @property
    def ready(self) -> bool:
        self._replace_dead_idle_workers()
        return self._replacing == 0 and not self._closed

    @property
    def recoverable(self) -> bool:
        return self._failed_starts < FAILED_STARTS_TO_GIVE_UP and not self._closed

    async def score(self, body: bytes, client_gone) -> tuple[dict[str, list[float]], int]:
        """Parse and score one /get_reward body on the next free worker: (scores, sample count).
        `client_gone` is an async callable; while the request waits in the queue it is polled,
        and a gone client's work is dropped (ClientGone). Raises what the worker raised
        (InvalidRequest, SampleError, RuntimeError), or PoolBusy, WorkerLost."""
        self._loop = asyncio.get_running_loop()
        worker = await self._acquire(client_gone)
        # _run gives the worker back itself, so a cancelled request cannot leak it.
        status, value = await self._loop.run_in_executor(self._threads, self._run, worker, body)
        if status == "ok":
            return value
        raise value

    async def _acquire(self, client_gone):
        self._replace_dead_idle_workers()
        if self._idle:
            return self._idle.pop()
        if len(self._waiters) >= self.max_queue:
            raise PoolBusy(f"all workers are busy and {len(self._waiters)} requests are queued (--max-queue)")
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            while not waiter.done():
                await asyncio.wait([waiter], timeout=CLIENT_CHECK_SECONDS)
                if not waiter.done() and await client_gone():
                    raise ClientGone()
            return waiter.result()
        except BaseException:
            if waiter.done():  # a worker was handed over just as this request gave up: pass it on
                self._release(waiter.result())
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            raise

    def _replace_dead_idle_workers(self) -> None:
        """A worker that died while idle (killed for memory, say) is replaced before it gets work."""
        for worker in [worker for worker in self._idle if not worker.process.is_alive()]:
            self._idle.remove(worker)
            logger.error("idle worker pid %d died (exit code %s); replacing it", worker.pid, worker.process.exitcode)
            self._replace()

    def _release(self, worker) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def _run(self, worker, job):
        """In a pool thread: send the job, wait for the answer up to the time limit."""
        process, connection = worker.process, worker.connection
        try:
            connection.send(job)
            if connection.poll(self.request_timeout):
                status, value = connection.recv()
                self._call_in_loop(self._release, worker)
                return status, value
            problem = f"scoring took over the {self.request_timeout:g} s limit (--request-timeout)"
        except (EOFError, OSError):
            problem = "its worker process died"
        process.kill()
        process.join()
        problem += f" (worker pid {process.pid}, exit code {process.exitcode}); the worker was replaced, retry"
        logger.error("request lost: %s", problem)
        self._call_in_loop(self._replace)
        return "error", WorkerLost(problem)

    def _replace(self) -> None:
        """In the event loop: start a replacement worker; `ready` is False until it is up."""
        if self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._replacing += 1

        def start() -> None:
            while not self._closed:
                try:
                    worker = self._wait_ready(*self._start_process())
                except RuntimeError:
                    self._failed_starts += 1
                    logger.exception("a replacement worker failed to start; trying again in %g s", RETRY_START_SECONDS)
                    time.sleep(RETRY_START_SECONDS)
                    continue
                self._failed_starts = 0
                self._call_in_loop(self._replaced, worker)
                return

        threading.Thread(target=start, daemon=True).start()

    def _call_in_loop(self, function, *args) -> None:
        if not self._closed:  # after close() the event loop may be gone
            self._loop.call_soon_threadsafe(function, *args)

    def _replaced(self, worker) -> None:
        self._replacing -= 1
        logger.warning("worker pid %d replaced the lost one", worker.pid)
        self._release(worker)

    def _start_process(self):
        parent_end, worker_end = self._context.Pipe()
        # daemon: the worker ends with the server, however the server stops.
        process = self._context.Process(
            target=worker_main, args=(self.spec, worker_end, os.getpid()), name="reward-scorer", daemon=True
        )
        process.start()
        worker_end.close()
        return process, parent_end

    def _wait_ready(self, process, connection):
        try:
            if not connection.poll(STARTUP_SECONDS):
                raise RuntimeError(f"did not start within {STARTUP_SECONDS} s")
            status, message = connection.recv()
        except (EOFError, OSError):
            process.join(5)
            status, message = "failed", f"exited with code {process.exitcode}"
        if status != "ready":
            process.kill()
            raise RuntimeError(f"a scorer worker for {self.spec.factory}{self.spec.args} failed to start: {message}")
        return Worker(process, connection)

    def close(self) -> None:
        """Kill every worker, busy ones included: their pool threads then return at once, so the
        server can exit without waiting for a batch."""
        self._closed = True
        for process in self._context.active_children():
            process.kill()
        self._threads.shutdown(wait=False, cancel_futures=True)


@dataclass
class Worker:
    process: multiprocessing.Process
    connection: object

    @property
    def pid(self) -> int:
        return self.process.pid


def worker_main(spec: ScorerSpec, connection, parent_pid: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {os.getpid()} %(levelname)s: %(message)s")
    # Ctrl-C reaches the whole process group; the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(parent_pid)
    try:
        scorer = spec.build()
    except BaseException:
        connection.send(("failed", traceback.format_exc(limit=-3)))
        return
    connection.send(("ready", None))
    while True:
        try:
            body = connection.recv()
        except EOFError:
            return
        try:
            answer = ("ok", score_request(scorer, body))
        except (InvalidRequest, SampleError) as error:  # picklable, and they name the field or sample
            answer = ("error", error)
        except Exception as error:  # any other exception may not pickle: send its text
            logger.exception("scoring failed")
            answer = ("error", RuntimeError(f"scoring failed: {type(error).__name__}: {error}"))
        connection.send(answer)


def exit_with_parent(parent_pid: int) -> None:
    """End this worker once the server process is gone (killed with -9, say), so that no worker
    is left waiting for work forever."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
