"""The no-progress clock that bounds a streamed upload (``until_stalled``): a transfer
that takes several times the limit but keeps moving completes; one that stops moving
is cancelled once the limit has passed since its last progress."""

from __future__ import annotations

import asyncio
import time

import pytest

from ckptkit.storage.deadlines import Clock, until_stalled

LIMIT = 0.5


async def _transfer(clock: Clock, moves: int, then_stall: bool, ended: list[str]) -> str:
    try:
        for _ in range(moves):
            await asyncio.sleep(LIMIT / 5)
            clock.progress()
        if then_stall:
            await asyncio.sleep(3600)
        return "done"
    finally:
        ended.append("cancelled" if then_stall else "finished")


def test_a_transfer_longer_than_the_limit_that_keeps_moving_completes() -> None:
    clock, ended = Clock(LIMIT), []
    start = time.monotonic()
    assert asyncio.run(until_stalled(clock, _transfer, clock, 15, False, ended)) == "done"
    assert time.monotonic() - start > 2 * LIMIT  # it really outlived the limit
    assert ended == ["finished"]


def test_a_transfer_that_stops_moving_is_cancelled_after_the_limit() -> None:
    clock, ended = Clock(LIMIT), []
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no progress"):
        asyncio.run(until_stalled(clock, _transfer, clock, 5, True, ended))
    took = time.monotonic() - start
    assert LIMIT * 1.5 < took < LIMIT * 1.5 + 10  # moved for ~LIMIT, then waited LIMIT
    assert ended == ["cancelled"]  # not left running on the loop
