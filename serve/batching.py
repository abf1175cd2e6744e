"""A bounded batcher: requests queue up (at most ``max_queue``); one consumer takes up to ``max_batch`` of them,
closing a batch when it is full or ``max_wait_s`` after its first request, and runs the model in a thread so the
event loop keeps accepting requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Overloaded(Exception):
    """The queue is full: answer 503 with Retry-After."""


class Batcher:
    def __init__(
        self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 32, max_wait_s: float = 0.005, max_queue: int = 256
    ) -> None:
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue(max_queue)
        self.batch_sizes: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    async def submit(self, item: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, future))
        except asyncio.QueueFull as err:
            raise Overloaded from err
        return await future

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            self.batch_sizes.append(len(batch))
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
            except Exception as err:  # noqa: BLE001 - handed to every waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
