"""`--ray`: the same job on a Ray cluster with Ray Data.

The driver reads the input files (so row errors and row numbers are the same as a local run),
turns the rows not yet finished into a dataset, and runs `map_batches` over an actor pool: each
actor holds one LLMEngine (one actor per GPU, or per `cpus_per_actor` CPUs without GPUs). The
result records stream back to the driver, which appends them to the journal and writes the same
output files as a local run. Killing the driver loses only the rows in flight; the same command
resumes.

Inside an actor, one thread drives the engine continuously (engine_loop.generate_rows) and
`__call__` only queues its rows and waits for their records, so with several calls in flight per
actor the engine's batch stays full across Ray batches instead of draining at each one.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import queue
import signal
import socket
import threading
from typing import Iterator

from starchat.batch.engine_loop import generate_rows

logger = logging.getLogger("starchat.batch")


class _QueueSource:
    """Tasks put by `__call__` threads; never exhausted (the actor lives as long as the pool)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()

    def take(self, count: int, wait: bool) -> list[dict]:
        taken = []
        try:
            if wait:
                taken.append(self.queue.get(timeout=0.1))
            while len(taken) < count:
                taken.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        return taken


class _Waiter:
    def __init__(self, count: int):
        self.remaining = count
        self.records: list[dict] = []
        self.done = threading.Event()


class EngineActor:
    """A Ray Data callable class: one engine, fed continuously by a background thread."""

    def __init__(self, model, dtype, device, max_concurrency, max_retries, job_parameters):
        from starchat.config import EngineConfig
        from starchat.engine.engine import LLMEngine
        from starchat.engine.engine_thread import start_engine_thread

        options = {"max_num_seqs": max_concurrency} if max_concurrency else {}
        self.source = _QueueSource()
        self.waiters: dict[tuple[int, int], _Waiter] = {}
        self.lock = threading.Lock()
        self.failure: BaseException | None = None
        # Loaded in the thread that drives it (one team of OpenMP threads on a CPU: engine_thread.py).
        self.engine, self.thread = start_engine_thread(
            lambda: LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, **options), progress=False),
            lambda engine: self._drive(engine, max_concurrency or engine.config.max_num_seqs, max_retries, job_parameters),
            name="starchat-batch-engine")

    def _drive(self, engine, max_in_flight: int, max_retries: int, job_parameters) -> None:
        try:
            for record in generate_rows(engine, self.source, max_in_flight=max_in_flight,
                                        max_retries=max_retries, job_parameters=job_parameters):
                with self.lock:
                    waiter = self.waiters.pop(tuple(record["k"]), None)
                if waiter is not None:
                    waiter.records.append(record)
                    waiter.remaining -= 1
                    if waiter.remaining == 0:
                        waiter.done.set()
        except BaseException as error:  # noqa: BLE001 - handed to every waiting call, which raises it
            self.failure = error
            with self.lock:
                for waiter in self.waiters.values():
                    waiter.done.set()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        tasks = [json.loads(text) for text in batch["task"]]
        waiter = _Waiter(len(tasks))
        with self.lock:
            for task in tasks:
                self.waiters[tuple(task["k"])] = waiter
        if not tasks:
            waiter.done.set()
        for task in tasks:
            self.source.queue.put(task)
        while not waiter.done.wait(timeout=1.0):
            if not self.thread.is_alive():
                break
        if self.failure is not None or waiter.remaining:
            raise RuntimeError(f"the engine thread of this actor stopped: {self.failure!r}")
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in waiter.records], dtype=object)}


def ray_records(tasks: Iterator[dict], *, address: str | None, model: str | None, dtype: str, device: str,
                job_parameters: dict | None, mini_batch_size: int, max_concurrency: int | None, max_retries: int,
                num_actors: int | None = None, cpus_per_actor: int = 4) -> Iterator[dict]:
    """Result records of `tasks` computed on a Ray cluster, in completion order."""
    import ray
    import ray.data

    started_here = not ray.is_initialized()
    if started_here:
        _join_cluster(address)
    try:
        items = [{"task": json.dumps(task, ensure_ascii=False)} for task in tasks]
        if not items:
            return
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        actor_cpus = 1 if gpus else max(1, min(cpus_per_actor, cpus))
        actors = num_actors or (gpus if gpus else max(1, cpus // actor_cpus))
        in_flight = max_concurrency or 64
        calls_per_actor = max(1, math.ceil(2 * in_flight / mini_batch_size))
        logger.info("ray: %d actors (%s each), %d rows", actors, "1 GPU" if gpus else f"{actor_cpus} CPUs", len(items))
        dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // mini_batch_size, 200)))
        results = dataset.map_batches(
            EngineActor, batch_size=mini_batch_size, compute=_actor_pool(actors, calls_per_actor),
            fn_constructor_kwargs=dict(model=model, dtype=dtype, device=device, max_concurrency=max_concurrency,
                                       max_retries=max_retries, job_parameters=job_parameters),
            num_cpus=actor_cpus, num_gpus=1 if gpus else 0)
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["record"]:
                yield json.loads(text)
    finally:
        if started_here:
            ray.shutdown()


class RayClusterError(ValueError):
    """No Ray cluster answers at the address given (the message says what to do)."""


def _join_cluster(address: str | None) -> None:
    """`ray.init`, failing within seconds, and saying what to do, when no cluster answers.

    Ray itself retries an address where nothing listens for minutes, and installs a SIGTERM
    handler that exits the process; the caller's handler is put back so that a scheduler's stop
    still ends the job as an interruption (journal consistent, summary written).
    """
    import ray

    if address not in (None, "local", "auto"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise RayClusterError(f"--ray {address}: no Ray cluster answers there ({reason}); start its head with "
                                  "`ray start --head` and pass the address it prints") from None
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    except ConnectionError as error:
        raise RayClusterError(f"--ray {address}: {error} (start a cluster with `ray start --head`, or pass --ray "
                              "alone to start one for this job)") from None
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _actor_pool(size: int, calls_per_actor: int):
    """A fixed pool whose actors run several calls at once where this Ray version allows it."""
    from ray.data import ActorPoolStrategy

    accepted = inspect.signature(ActorPoolStrategy.__init__).parameters
    options = {"size": size}
    if "max_concurrent_calls_per_actor" in accepted and "enable_true_multi_threading" in accepted:
        options.update(max_concurrent_calls_per_actor=calls_per_actor, enable_true_multi_threading=True)
    elif "max_tasks_in_flight_per_actor" in accepted:
        options.update(max_tasks_in_flight_per_actor=calls_per_actor)
    return ActorPoolStrategy(**options)
