"""``AsyncGenerator``: the generator driven from asyncio.

Steps run in a worker thread (``asyncio.to_thread``) so the event loop stays
responsive; each submitted job gets an async iterator of its ``JobEvent``s:

    agen = AsyncGenerator(Generator(model))
    async for event in agen.submit(Job("Hello", max_new_tokens=20)):
        print(event.text, end="")
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from .generator import Generator
from .job import Job, JobEvent, route_events


class AsyncGenerator:
    def __init__(self, generator: Generator):
        self.generator = generator
        self._lock = threading.Lock()  # enqueue/cancel vs the worker thread's step()
        self._queues: dict[int, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None

    def submit(self, job: Job) -> AsyncIterator[JobEvent]:
        """Queue ``job`` (raises InvalidArgumentError at once for a bad request); iterate its events."""
        with self._lock:
            self.generator.enqueue(job)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[job.id] = queue
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._drive())
        return self._events(job, queue)

    async def _events(self, job: Job, queue: asyncio.Queue) -> AsyncIterator[JobEvent]:
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finished:
                    return
        finally:
            if not job.finished:  # the consumer stopped listening: stop the job too
                job.cancel()

    def _step(self) -> list[JobEvent]:
        with self._lock:
            return self.generator.step()

    async def _drive(self) -> None:
        while self.generator.has_work:
            route_events(await asyncio.to_thread(self._step), self._queues)
            await asyncio.sleep(0)
