"""Predictions whose client went away are cancelled; quick ones never watch their connection."""

from __future__ import annotations

import asyncio
from typing import Any

from frontend.disconnects import DisconnectWatch


def test_a_waiting_prediction_whose_client_goes_away_is_cancelled_and_a_quick_one_never_watches() -> None:
    async def main() -> tuple[list[str], bool, bool, int]:
        loop = asyncio.get_running_loop()
        watch = DisconnectWatch(0.02)
        calls: list[str] = []
        client_gone = asyncio.Event()

        async def quick_receive() -> dict[str, Any]:
            calls.append("quick")
            return {"type": "http.disconnect"}

        async def slow_receive() -> dict[str, Any]:
            calls.append("slow")
            await client_gone.wait()
            return {"type": "http.disconnect"}

        async def prediction(receive: Any, seconds: float) -> str:
            task = asyncio.current_task()
            assert task is not None
            watch.add(task, receive, loop)
            try:
                await asyncio.sleep(seconds)  # waiting on the broker
                return "answered"
            except asyncio.CancelledError:
                return "client gone" if watch.done(task) else "cancelled"
            finally:
                watch.done(task)

        quick = asyncio.create_task(prediction(quick_receive, 0.001))
        slow = asyncio.create_task(prediction(slow_receive, 10))
        patient = asyncio.create_task(prediction(slow_receive, 0.1))  # watched, answered, watcher dropped
        assert await quick == "answered"
        await asyncio.sleep(0.05)  # past after_s: the slow ones watch their connections
        assert not slow.done()
        assert await patient == "answered"
        client_gone.set()
        result = await asyncio.wait_for(slow, 1)
        return calls, result == "client gone", not watch._watchers and not watch._waiting, len(watch._gone)

    calls, cancelled_as_gone, nothing_left, gone_left = asyncio.run(main())
    assert calls == ["slow", "slow"], "the quick prediction never called receive()"
    assert cancelled_as_gone and nothing_left and gone_left == 0
