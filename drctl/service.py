"""Run a long-lived drctl process (worker, prober) until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from drctl.settings import DrctlSettings

Service = Callable[[DrctlSettings, asyncio.Event], Awaitable[None]]


def run_service(service: Service) -> None:
    """Log to stderr, read settings from ``DRCTL_*``, and run ``service`` until a stop signal."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe request is noise
    settings = DrctlSettings()

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service(settings, stop)

    asyncio.run(_main())
