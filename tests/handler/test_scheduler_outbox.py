"""`scheduler._Outbox`: event-loop tickets' events reach their queues in order, with one
``call_soon_threadsafe`` per loop per scheduler iteration (not one per token)."""
from __future__ import annotations

import asyncio
import threading

from handler.scheduler import Finished, TextDelta, _Outbox


class _CountingLoop:
    """An event loop running on its own thread that counts the thread-safe calls it is given."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.calls = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        real = self.loop.call_soon_threadsafe

        def counting(*args):
            self.calls += 1
            return real(*args)

        self.loop.call_soon_threadsafe = counting

    def drain(self, q: asyncio.Queue, n: int) -> list:
        async def take():
            return [await q.get() for _ in range(n)]

        return asyncio.run_coroutine_threadsafe(take(), self.loop).result(5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def _queue(loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    return asyncio.run_coroutine_threadsafe(_make_queue(), loop).result(5)


async def _make_queue() -> asyncio.Queue:
    return asyncio.Queue()


def test_one_thread_safe_call_per_loop_and_events_in_order():
    a, b = _CountingLoop(), _CountingLoop()
    try:
        qa1, qa2, qb = _queue(a.loop), _queue(a.loop), _queue(b.loop)
        a.calls = b.calls = 0
        box = _Outbox()
        events = {id(q): [] for q in (qa1, qa2, qb)}
        for step in range(5):
            for q, loop in ((qa1, a.loop), (qa2, a.loop), (qb, b.loop)):
                e = TextDelta(f"{step}", (step,), None)
                events[id(q)].append(e)
                box.add(loop, q, e)
        box.flush()
        assert a.calls == 1 and b.calls == 1  # 15 events, two loops: two wake-ups
        for q, loop in ((qa1, a), (qa2, a), (qb, b)):
            assert loop.drain(q, 5) == events[id(q)]
        calls = a.calls, b.calls  # the drains' own calls
        box.flush()  # nothing pending: no call at all
        assert (a.calls, b.calls) == calls
    finally:
        a.close()
        b.close()


def test_a_closed_loop_loses_its_events_and_nothing_else():
    a, b = _CountingLoop(), _CountingLoop()
    qa, qb = _queue(a.loop), _queue(b.loop)
    box = _Outbox()
    box.add(a.loop, qa, TextDelta("x", (1,), None))
    box.add(b.loop, qb, Finished(reply=None))
    a.close()
    try:
        box.flush()  # no exception for the closed loop
        assert b.drain(qb, 1) == [Finished(reply=None)]
    finally:
        b.close()
