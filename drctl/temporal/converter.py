"""The data converter every drctl client and worker uses: pydantic payloads, and a one-line failure
for input that does not validate.

A runbook started from the Temporal UI or ``temporal workflow start`` with bad JSON (``{"model":
"NOPE!"}``, a missing ``instance``) fails at once: each workflow lists pydantic's ``ValidationError``
in ``failure_exception_types``. By default that failure carried pydantic's multi-line text and a
stack trace of the SDK's decoding internals. Here it becomes one line naming each field and the value
given (``invalid FailoverRequest: model 'NOPE!': should match pattern …``) and no stack trace; its
type stays ``ValidationError``. Only the failure's text changes, never whether or when a run fails,
so replay is unaffected.

A run started with **no input at all** (the UI's Start Workflow form with an empty Input box,
``temporal workflow start`` without ``--input``) never reaches the payload converter: with no payload
to decode, the SDK calls the workflow's ``@workflow.init`` or ``@workflow.run`` with no argument, and
the ``TypeError`` that raises failed the *workflow task*, which the SDK retried for ever (the run
stuck "Running", a stack trace in the worker's log at every retry). :class:`MissingWorkflowInput`
matches that ``TypeError`` (and no other), and every worker built on :func:`drctl.temporal.client.connect`
lists it in its ``workflow_failure_exception_types`` (:data:`missing_input_plugin`), so such a run fails
at its first workflow task with one line: ``FailoverWorkflow was started with no input: it takes
'request', one JSON object …``, failure type ``MissingInput``.
"""

from __future__ import annotations

import dataclasses
import re

import temporalio.api.failure.v1
import temporalio.workflow
from pydantic import ValidationError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DefaultFailureConverter, PayloadConverter
from temporalio.plugin import SimplePlugin

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


MISSING_INPUT = "MissingInput"
"""The failure type of a run started with no input."""
_MISSING_ARGUMENTS = re.compile(
    r"(?P<function>[\w.]+)\(\) missing \d+ required (?:positional |keyword-only )?arguments?: (?P<names>.+)"
)
_SDK_MODULE = "temporalio/worker/_workflow_instance.py"
_SDK_CALLERS = frozenset({"_instantiate_workflow_object", "execute_workflow"})
"""Where the SDK calls a workflow's ``@workflow.init`` (``cls(*args)``) and ``@workflow.run``
(``run_fn(instance, *args)``) with the arguments it decoded from the start's input."""


def missing_input(error: BaseException) -> tuple[str, list[str]] | None:
    """``(workflow class, parameters not given)`` when ``error`` is the ``TypeError`` the SDK raises
    calling a workflow's init or run method with fewer arguments than it takes (its input had fewer
    payloads: none at all from an empty Input box), else None.

    Only that error: the message must say arguments are missing *and* the innermost frame must be
    the SDK's own call of the workflow (the error is raised at the call, before the workflow's code
    runs), so a ``TypeError`` from a bug inside a workflow still fails only the workflow task, which a
    fixed worker can retry."""
    if type(error) is not TypeError:
        return None
    match = _MISSING_ARGUMENTS.fullmatch(str(error))
    frame = error.__traceback__
    if match is None or frame is None:
        return None
    while frame.tb_next is not None:
        frame = frame.tb_next
    code = frame.tb_frame.f_code
    if code.co_name not in _SDK_CALLERS or not code.co_filename.replace("\\", "/").endswith(_SDK_MODULE):
        return None
    workflow_class = match["function"].rsplit(".", 1)[0]
    return workflow_class, re.findall(r"'(\w+)'", match["names"])


def missing_input_message(workflow_class: str, names: list[str]) -> str:
    """The one line; it names the workflow type when known (the class name otherwise)."""
    name = workflow_class
    try:
        if temporalio.workflow.in_workflow():
            name = temporalio.workflow.info().workflow_type
    except Exception:  # a failure converter must not fail: the class name will do
        pass
    wanted = " and ".join(repr(n) for n in names) or "its input"
    return (
        f"{name} was started with no input: it takes {wanted}, one JSON object "
        "(the Input box of the Temporal UI's Start Workflow form, --input with the Temporal CLI)"
    )


class _MatchesMissingInput(type):
    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, BaseException) and missing_input(instance) is not None


class MissingWorkflowInput(Exception, metaclass=_MatchesMissingInput):
    """Never raised: ``isinstance(error, MissingWorkflowInput)`` holds for the ``TypeError`` of a run
    started with no input (:func:`missing_input`). As a worker's workflow failure exception type, it
    makes that error fail the run (the SDK checks ``isinstance``) instead of its workflow task."""


missing_input_plugin = SimplePlugin(
    "drctl.missing-workflow-input", workflow_failure_exception_types=[MissingWorkflowInput]
)
"""For ``Client.connect(plugins=...)``: every worker built on that client fails a run started with no
input at once (the SDK would retry its first workflow task for ever)."""


class OneLineValidationFailures(DefaultFailureConverter):
    """The SDK's failure converter, but a pydantic ``ValidationError`` becomes one line without a
    stack trace (wherever it is in a failure's chain of causes), and so does a run started with no
    input (:class:`MissingWorkflowInput`)."""

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
        missing = missing_input(exception)
        if missing is not None:
            failure.message = missing_input_message(*missing)
            failure.stack_trace = ""
            failure.application_failure_info.SetInParent()
            failure.application_failure_info.type = MISSING_INPUT
            failure.application_failure_info.non_retryable = True
            return
        super().to_failure(exception, payload_converter, failure)


drctl_data_converter = dataclasses.replace(pydantic_data_converter, failure_converter_class=OneLineValidationFailures)
"""pydantic payloads (``temporalio.contrib.pydantic``), one-line validation failures."""
