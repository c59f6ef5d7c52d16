"""The xDS server process of the local stack: Envoy's endpoints, from the EDS files, over ADS.

    python -m drctl.workers.xds_server      # settings from DRCTL_* variables; `drctl up` starts it

It listens on loopback at ``DRCTL_XDS_PORT`` and serves the files under the state folder's
``envoy/eds/`` (see :mod:`drctl.platforms.local.xds` for why Envoy does not read them itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from drctl.platforms.local import xds
from drctl.service import run_service
from drctl.settings import LOOPBACK, DrctlSettings, StateLayout


async def run_xds_server(settings: DrctlSettings, stop: asyncio.Event) -> None:
    store = xds.open_store(StateLayout(settings.state_dir).eds_dir)
    await xds.serve(store, LOOPBACK, settings.xds_port, stop)


def main(argv: Sequence[str] | None = None) -> None:
    run_service(
        run_xds_server,
        argv,
        prog="python -m drctl.workers.xds_server",
        description="The local stack's xDS server: serves Envoy the endpoints of the EDS files over ADS.",
    )


if __name__ == "__main__":
    main()
