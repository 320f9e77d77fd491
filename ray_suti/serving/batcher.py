"""Dynamic batching for a model replica: a batch is cut when the sampler is free, not before.

Jobs wait in one queue; one drawing loop takes up to ``max_batch_size`` of them each time it is free
(waiting ``wait_s`` for more when fewer are queued) and draws them together in a thread, off the
replica's event loop.

Why not ``@serve.batch``: it cuts a batch ``batch_wait_timeout_s`` after the batch's first request
arrives, also while the previous batch still draws, and the cut batch then waits its turn. Under
steady load requests come back in the groups whose results went out together, so each batch stayed
as small as the group it was cut from. Cutting at the moment the sampler is free takes everything that
queued meanwhile.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Job:
    job: dict
    progress: bool
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("step", event) ..., then ("result" | "error", x)
    abandoned: bool = False  # its caller went away: not drawn if still queued


class Batcher:
    """``draw(jobs, report)`` returns one result per job; it may call ``report(members, step, steps)``
    from its thread, ``members`` the indices (into ``jobs``) of the jobs in the loop at that step."""

    def __init__(self, draw, max_batch_size: int, wait_s: float = 0.02):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.draw, self.max_batch_size, self.wait_s = draw, max_batch_size, wait_s
        self.queue: asyncio.Queue | None = None
        self.drawing: asyncio.Task | None = None

    async def submit(self, job: dict, progress: bool = False):
        """Yields ``{"step", "steps"}`` events (when ``progress``), then the job's result; raises what
        ``draw`` raised for its batch."""
        if self.drawing is None:  # made on the replica's own event loop, at its first job
            self.queue = asyncio.Queue()
            self.drawing = asyncio.create_task(self._drawing_loop())
        entry = _Job(job, progress)
        self.queue.put_nowait(entry)
        try:
            while True:
                kind, value = await entry.events.get()
                if kind == "error":
                    raise value
                yield value
                if kind == "result":
                    return
        finally:
            entry.abandoned = True

    async def _next_batch(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [e for e in batch if not e.abandoned]

    async def _drawing_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue

            def report(members: list[int], step: int, steps: int, batch=batch) -> None:  # the drawing thread
                for i in members:
                    if batch[i].progress:
                        loop.call_soon_threadsafe(batch[i].events.put_nowait, ("step", {"step": step, "steps": steps}))

            wanted = any(e.progress for e in batch)
            try:  # step events scheduled by the thread reach their queues before the results below
                results = await asyncio.to_thread(self.draw, [e.job for e in batch], report if wanted else None)
            except Exception as e:  # noqa: BLE001 - every job of the batch hears it; the loop goes on
                for entry in batch:
                    entry.events.put_nowait(("error", e))
            else:
                for entry, result in zip(batch, results):
                    entry.events.put_nowait(("result", result))
