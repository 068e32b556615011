"""Async plumbing of the serving layer: fan-in of several generations, cancellation when the
client disconnects, and Server-Sent Events that stop the generation the moment the client leaves.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

from starlette.responses import Response

logger = logging.getLogger("starchat.server")


class ClientDisconnected(Exception):
    """The client closed the connection; its generations have been cancelled."""


async def gather_or_cancel(coroutines: list[Awaitable]) -> list:
    """Run all; the first failure cancels the rest (their generations are aborted) and is raised."""
    if len(coroutines) == 1:
        return [await coroutines[0]]
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index, item) from several async iterators as items arrive; closing it cancels them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async with aclosing(stream) as items:
                async for item in items:
                    queue.put_nowait((index, item, None))
            queue.put_nowait((index, done, None))
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # handed to the consumer, which re-raises it
            queue.put_nowait((index, None, error))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable):
    """The result of `work`, unless the client disconnects first: then `work` is cancelled."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse(Response):
    """Server-Sent Events from an async iterator of ready-made event strings.

    The stream runs while a second task waits for the client's `http.disconnect`; the first
    to finish cancels the other, so a client that leaves cancels its generation at once.
    `on_close` runs in every case (it releases the admission slots).
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(content=None, status_code=200, media_type=self.media_type,
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})
        self.raw_headers = [(key, value) for key, value in self.raw_headers if key != b"content-length"]
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            stream_task = asyncio.ensure_future(self._send_events(send))
            watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
            disconnected = False
            try:
                await asyncio.wait({stream_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
                disconnected = not stream_task.done()
            finally:
                for task in (stream_task, watcher):
                    task.cancel()
                await asyncio.gather(stream_task, watcher, return_exceptions=True)
            if disconnected:
                logger.info("client disconnected mid-stream; generation cancelled")
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _send_events(self, send) -> None:
        try:
            async with aclosing(self.events) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})
        except asyncio.CancelledError:
            raise
        except OSError:
            return  # the socket is gone
        except Exception:
            logger.exception("a stream failed after its headers were sent")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
