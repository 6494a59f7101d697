"""The bridge from trio to nats-py, shared by the federation's and the cluster's engines.

nats-py is asyncio and fs9 is trio, so a client lives on an asyncio loop in a thread of
its own (one Bridge, one loop, one thread), and trio awaits each call's result (`call`):
the coroutine runs on that loop, and its completion wakes the trio task through the trio
token, so no thread blocks per call.
"""
import asyncio
import threading

import nats.errors
import nats.js.api as api
import nats.js.errors
import trio

from ..errors import EngineError


class Bridge:
    """An asyncio loop running in a daemon thread named `name`, until close()."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self._thread.start()

    async def call(self, coro):
        """Run coro on the bridge's loop; its result here, or EngineError. Blocks until
        it is done; a trio cancellation cancels it there too."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_):
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # trio has ended: nobody waits
        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        try:
            return future.result()
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            raise EngineError(f"{type(e).__name__}: {e}".rstrip(": ")) from None

    def close(self, cleanup=None) -> None:
        """Run cleanup() (a coroutine function, e.g. closing the connection; its errors
        ignored, at most 3 s) on the loop, then end the loop's thread. Not awaited: for
        unmount, from any thread but the loop's."""
        if cleanup is not None:
            async def quietly():
                try:
                    await cleanup()
                except Exception:
                    pass
            try:
                asyncio.run_coroutine_threadsafe(quietly(), self.loop).result(timeout=3)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)


async def ensure_stream(js, **config) -> None:
    """The stream as configured, on disk: created, or updated to this configuration.
    Runs on the bridge's loop (inside a coroutine given to call)."""
    cfg = api.StreamConfig(storage=api.StorageType.FILE, **config)
    try:
        await js.add_stream(cfg)
    except nats.js.errors.BadRequestError:
        await js.update_stream(cfg)
