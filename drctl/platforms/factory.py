"""The platform the settings choose: one interface, two implementations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drctl.platforms.local.platform import LocalPlatform
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings

if TYPE_CHECKING:
    from drctl.platforms.kubernetes.platform import KubernetesPlatform


def make_platform(settings: DrctlSettings, policy: DRPolicy) -> LocalPlatform | KubernetesPlatform:
    """The platform the settings choose (``DRCTL_PLATFORM=local|kubernetes``); workflows never know.

    The Kubernetes client is imported only when it is used: it takes ~1.5 s to import, and a worker
    restarted in the middle of a failover should poll again as soon as it can."""
    if settings.platform == "local":
        return LocalPlatform(settings, policy)
    from kubernetes import client, config

    from drctl.platforms.kubernetes.platform import KubernetesPlatform

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(context=settings.kubernetes_context)  # type: ignore[no-untyped-call]
    return KubernetesPlatform(
        client.ApiClient(),
        settings.kubernetes_namespace,
        policy,
        image=settings.kubernetes_image,
        model_source=settings.kubernetes_model_source,
        models_claim=settings.kubernetes_models_claim or None,
        node_agent_urls=settings.node_agent_urls,
        node_agent_service=settings.node_agent_service,
        istio_virtual_service=settings.kubernetes_istio_virtual_service,
        istio_primary_host=settings.kubernetes_istio_primary_host,
        istio_standby_host=settings.kubernetes_istio_standby_host,
    )
