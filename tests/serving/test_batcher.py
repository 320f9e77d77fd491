"""The model replica's batching: a batch is cut when the sampler is free (no Ray needed)."""
import asyncio
import threading
import time

import pytest

from ray_suti.serving.batcher import Batcher


class Sampler:
    """Draws a batch in ``seconds``, reporting each of ``steps`` steps; records the batches."""

    def __init__(self, seconds: float = 0.3, steps: int = 3, fail_on: str | None = None):
        self.seconds, self.steps, self.fail_on, self.batches = seconds, steps, fail_on, []
        self.threads = set()

    def __call__(self, jobs, report=None):
        self.threads.add(threading.get_ident())
        self.batches.append([j["id"] for j in jobs])
        if self.fail_on in self.batches[-1]:
            raise RuntimeError("the sampler broke")
        for step in range(1, self.steps + 1):
            time.sleep(self.seconds / self.steps)
            if report:
                report(list(range(len(jobs))), step, self.steps)
        return [{"status": 200, "id": j["id"]} for j in jobs]


async def collect(batcher, job_id, progress=False, delay=0.0):
    await asyncio.sleep(delay)
    return [item async for item in batcher.submit({"id": job_id}, progress=progress)]


def test_jobs_that_arrive_while_a_batch_draws_make_one_full_batch_next():
    """Three jobs arriving 60 ms apart (each past the 20 ms wait) while the first batch draws:
    ``@serve.batch`` would have cut each into a batch of its own; here they are drawn together."""
    sampler = Sampler(seconds=0.4)

    async def main():
        batcher = Batcher(sampler, max_batch_size=8)
        return await asyncio.gather(collect(batcher, "a"), *(collect(batcher, j, delay=0.05 + 0.06 * n)
                                                               for n, j in enumerate("bcd")))

    results = asyncio.run(main())
    assert sampler.batches == [["a"], ["b", "c", "d"]]
    assert [r[-1] for r in results] == [{"status": 200, "id": j} for j in "abcd"]
    assert threading.get_ident() not in sampler.threads  # drawn off the event loop


def test_a_batch_holds_at_most_max_batch_size_and_the_rest_wait_in_order():
    sampler = Sampler(seconds=0.05)

    async def main():
        batcher = Batcher(sampler, max_batch_size=3)
        return await asyncio.gather(*(collect(batcher, str(n)) for n in range(7)))

    asyncio.run(main())
    assert sampler.batches == [["0", "1", "2"], ["3", "4", "5"], ["6"]]


def test_progress_reaches_only_the_jobs_that_ask_and_comes_before_the_result():
    sampler = Sampler(seconds=0.06, steps=3)

    async def main():
        batcher = Batcher(sampler, max_batch_size=8)
        return await asyncio.gather(collect(batcher, "p", progress=True), collect(batcher, "q"))

    with_progress, without = asyncio.run(main())
    assert with_progress == [{"step": s, "steps": 3} for s in (1, 2, 3)] + [{"status": 200, "id": "p"}]
    assert without == [{"status": 200, "id": "q"}]


def test_a_failing_batch_fails_its_jobs_and_the_next_batch_still_draws():
    sampler = Sampler(seconds=0.2, fail_on="bad")

    async def main():
        batcher = Batcher(sampler, max_batch_size=8)
        first = await asyncio.gather(collect(batcher, "bad"), collect(batcher, "with-it"), return_exceptions=True)
        return first, await collect(batcher, "after")

    first, after = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "broke" in str(e) for e in first)
    assert after == [{"status": 200, "id": "after"}]


def test_a_job_whose_caller_went_away_is_not_drawn():
    sampler = Sampler(seconds=0.3)

    async def main():
        batcher = Batcher(sampler, max_batch_size=8)
        first = asyncio.create_task(collect(batcher, "first"))
        await asyncio.sleep(0.1)  # "first" is drawing
        gone = asyncio.create_task(collect(batcher, "gone"))
        await asyncio.sleep(0.05)
        gone.cancel()
        return await first, await collect(batcher, "kept")

    asyncio.run(main())
    assert sampler.batches == [["first"], ["kept"]]


def test_max_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Sampler(), max_batch_size=0)
