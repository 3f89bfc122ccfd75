"""``ThreadedGenerator``: one background thread steps a ``Generator``; callers in other threads
submit jobs and read each job's events from its own ``queue.Queue``.

text-generation-webui calls a model from several threads at once (the UI and parallel API
requests), and a ``Generator`` is not thread-safe, so every ``enqueue``/``step`` goes through one
lock and one stepping thread.
"""

from __future__ import annotations

import queue
import threading

from ..runtime.job import route_events
from .common import log


class ThreadedGenerator:
    def __init__(self, generator):
        self.generator = generator
        self._lock = threading.Lock()
        self._queues: dict[int, queue.Queue] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="exl3-triton-generator", daemon=True)
        self._thread.start()

    def submit(self, job) -> queue.Queue:
        """Queue ``job`` (raises InvalidArgumentError for a bad request); its events arrive on the queue."""
        events: queue.Queue = queue.Queue()
        with self._lock:
            self.generator.enqueue(job)
            self._queues[job.id] = events
        self._wake.set()
        return events

    def cancel(self, job) -> None:
        """Stop ``job`` (a no-op once it finished); the stepping thread frees it at its next step."""
        job.cancel()
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.generator.has_work
                if busy:
                    try:
                        events = self.generator.step()
                    except Exception as e:  # hand the error to every waiting caller instead of dying
                        log.exception("exl3-triton generator step failed")
                        for q in self._queues.values():
                            q.put(e)
                        self._queues.clear()
                        for job in list(self.generator.running) + list(self.generator.waiting):
                            job.cancel()
                        events = []
                    route_events(events, self._queues)
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self.generator.has_work

    def stop(self) -> None:
        """Cancel every job, finish them, and end the thread."""
        with self._lock:
            for job in list(self.generator.running) + list(self.generator.waiting):
                job.cancel()
        self._wake.set()
        deadline = 200
        while not self.idle and deadline:  # let the thread finish the cancelled jobs (frees their pages)
            self._wake.set()
            threading.Event().wait(0.01)
            deadline -= 1
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)
