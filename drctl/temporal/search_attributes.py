"""Register drctl's custom search attributes on a Temporal namespace (idempotent)."""

from __future__ import annotations

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from drctl.payloads import SearchAttr


def dev_server_flags() -> list[str]:
    """``--search-attribute`` flags that register them when the dev server starts."""
    flags = []
    for name in SearchAttr.KEYWORDS:
        flags += ["--search-attribute", f"{name}=Keyword"]
    for name in SearchAttr.INTS:
        flags += ["--search-attribute", f"{name}=Int"]
    return flags


async def register_search_attributes(client: Client, namespace: str) -> list[str]:
    """Add whichever of drctl's search attributes the namespace lacks; returns those added."""
    wanted = {name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in SearchAttr.KEYWORDS}
    wanted |= {name: IndexedValueType.INDEXED_VALUE_TYPE_INT for name in SearchAttr.INTS}
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        missing = {k: v for k, v in wanted.items() if k not in existing.custom_attributes}
    except RPCError as err:
        # The time-skipping test server cannot list them; adding all of them works there.
        if err.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        missing = wanted
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
    return sorted(missing)
