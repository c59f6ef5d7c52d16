"""The data converter every drctl client and worker uses: pydantic payloads, and a one-line failure
for input that does not validate.

A runbook started from the Temporal UI or ``temporal workflow start`` with bad JSON (``{"model":
"NOPE!"}``, a missing ``instance``) fails at once: each workflow lists pydantic's ``ValidationError``
in ``failure_exception_types``. By default that failure carried pydantic's multi-line text and a
stack trace of the SDK's decoding internals. Here it becomes one line naming each field and the value
given (``invalid FailoverRequest: model 'NOPE!': should match pattern …``) and no stack trace; its
type stays ``ValidationError``. Only the failure's text changes, never whether or when a run fails,
so replay is unaffected.
"""

from __future__ import annotations

import dataclasses

import temporalio.api.failure.v1
from pydantic import ValidationError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DefaultFailureConverter, PayloadConverter

INPUT_SHOWN = 80
"""At most this many characters of a bad value go into the message."""
MESSAGE_MAX = 1000


def one_line(error: ValidationError) -> str:
    """``invalid Model: field 'value': what is wrong; other: Field required`` on one line."""
    parts = []
    for item in error.errors(include_url=False):
        field = ".".join(str(p) for p in item["loc"]) or "input"
        what = str(item["msg"]).replace("\n", " ")
        if item["type"] == "missing":
            parts.append(f"{field}: missing")
            continue
        shown = repr(item.get("input"))
        if len(shown) > INPUT_SHOWN:
            shown = shown[: INPUT_SHOWN - 1] + "…"
        parts.append(f"{field} {shown}: {what[0].lower() + what[1:] if what else what}")
    message = f"invalid {error.title}: " + "; ".join(parts)
    return message if len(message) <= MESSAGE_MAX else message[: MESSAGE_MAX - 1] + "…"


class OneLineValidationFailures(DefaultFailureConverter):
    """The SDK's failure converter, but a pydantic ``ValidationError`` becomes one line without a
    stack trace (wherever it is in a failure's chain of causes)."""

    def to_failure(
        self,
        exception: BaseException,
        payload_converter: PayloadConverter,
        failure: temporalio.api.failure.v1.Failure,
    ) -> None:
        if isinstance(exception, ValidationError):
            failure.message = one_line(exception)
            failure.stack_trace = ""
            failure.application_failure_info.SetInParent()
            failure.application_failure_info.type = type(exception).__name__
            return
        super().to_failure(exception, payload_converter, failure)


drctl_data_converter = dataclasses.replace(pydantic_data_converter, failure_converter_class=OneLineValidationFailures)
"""pydantic payloads (``temporalio.contrib.pydantic``), one-line validation failures."""
