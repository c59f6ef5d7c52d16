"""One way to connect to Temporal, with the pydantic data converter every drctl payload needs.

TLS and Temporal Cloud come from settings: ``DRCTL_TEMPORAL_TLS_CERT``/``_KEY`` (mTLS),
``DRCTL_TEMPORAL_TLS_CA``, or ``DRCTL_TEMPORAL_API_KEY``; any of them turns TLS on.
"""

from __future__ import annotations

from collections.abc import Sequence

from temporalio.client import Client, Interceptor
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig

from drctl.settings import DrctlSettings
from drctl.temporal.converter import drctl_data_converter, missing_input_plugin


class TemporalSettingsError(ValueError):
    pass


def tls_config(settings: DrctlSettings) -> TLSConfig | bool:
    """The TLS to use for ``settings``: False (plain), True (system CAs) or a ``TLSConfig``."""
    if (settings.temporal_tls_cert is None) != (settings.temporal_tls_key is None):
        raise TemporalSettingsError(
            "DRCTL_TEMPORAL_TLS_CERT and DRCTL_TEMPORAL_TLS_KEY go together: set both or neither"
        )
    wants_tls = settings.temporal_tls or settings.temporal_api_key is not None
    if settings.temporal_tls_cert is None and settings.temporal_tls_ca is None:
        return wants_tls
    try:
        return TLSConfig(
            client_cert=settings.temporal_tls_cert.read_bytes() if settings.temporal_tls_cert else None,
            client_private_key=settings.temporal_tls_key.read_bytes() if settings.temporal_tls_key else None,
            server_root_ca_cert=settings.temporal_tls_ca.read_bytes() if settings.temporal_tls_ca else None,
        )
    except OSError as exc:
        raise TemporalSettingsError(f"cannot read a Temporal TLS file: {exc}") from None


async def connect(
    settings: DrctlSettings, runtime: Runtime | None = None, interceptors: Sequence[Interceptor] = ()
) -> Client:
    """A client for ``settings``. ``runtime``: the SDK runtime to use (the worker's exports the SDK's
    own metrics to Prometheus, see :mod:`drctl.telemetry.metrics`); None: the SDK's default one.
    ``interceptors``: the tracing one when tracing is on (:mod:`drctl.telemetry.tracing`); a worker
    built on this client uses them too. A worker built on it also fails a run started with no input
    at once (:data:`drctl.temporal.converter.missing_input_plugin`)."""
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=drctl_data_converter,
        tls=tls_config(settings),
        api_key=api_key,
        runtime=runtime,
        plugins=[missing_input_plugin],
        interceptors=interceptors,
    )
