"""``drctl trace WORKFLOW_ID``: the trace of one runbook, from the spans file in the state folder.

Tracing writes ``{state}/traces/*.jsonl`` when no OTLP endpoint is set (:mod:`drctl.telemetry.tracing`).
This finds the trace(s) with a span of the workflow (the SDK's ``temporalWorkflowID`` attribute) and
prints each as a tree: every span with its duration, its start after the trace's first span, and
drctl's attributes (model, instance, tier, trigger, epoch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.tree import Tree

from drctl.cli.common import EXIT_FAILED, StateOption, fail, make_settings, out
from drctl.telemetry.tracing import read_spans, traces_dir

WORKFLOW_ATTRIBUTE = "temporalWorkflowID"
HOW_TO_TURN_ON = (
    "Tracing writes spans there when no OTEL_EXPORTER_OTLP_ENDPOINT is set and OTEL_SDK_DISABLED is not "
    "true: from `drctl up`'s worker, prober and alert receiver, and from `drctl failover`, `drain`, "
    "`zone-failover` and `failback`. With an OTLP endpoint set, the spans are in your tracing backend."
)


@dataclass
class SpanNode:
    record: dict[str, Any]
    children: list[SpanNode] = field(default_factory=list)

    @property
    def start_ns(self) -> int:
        return int(self.record.get("start_ns") or 0)


def traces_of(spans: list[dict[str, Any]], workflow_id: str) -> dict[str, list[SpanNode]]:
    """The trees (roots first, children by start) of each trace with a span of ``workflow_id``,
    oldest trace first."""
    wanted: dict[str, int] = {}
    for record in spans:
        if (record.get("attributes") or {}).get(WORKFLOW_ATTRIBUTE) == workflow_id:
            trace_id = str(record["trace_id"])
            start = int(record.get("start_ns") or 0)
            wanted[trace_id] = min(wanted.get(trace_id, start), start)
    trees: dict[str, list[SpanNode]] = {}
    for trace_id in sorted(wanted, key=lambda t: wanted[t]):
        nodes: dict[str, SpanNode] = {}
        for record in spans:
            if record["trace_id"] == trace_id:
                nodes.setdefault(str(record["span_id"]), SpanNode(record))  # a span exported twice: once
        roots: list[SpanNode] = []
        for node in nodes.values():
            parent = nodes.get(str(node.record.get("parent_id")))
            (parent.children if parent is not None else roots).append(node)
        for node in nodes.values():
            node.children.sort(key=lambda n: n.start_ns)
        trees[trace_id] = sorted(roots, key=lambda n: n.start_ns)
    return trees


def _label(node: SpanNode, origin_ns: int, workflow_id: str, parent_workflow: str | None) -> str:
    record = node.record
    attributes = record.get("attributes") or {}
    name = escape(str(record.get("name", "?")))
    if attributes.get(WORKFLOW_ATTRIBUTE) == workflow_id:
        name = f"[bold]{name}[/]"
    if record.get("status") == "ERROR":
        name = f"[red]{name} ✗[/]"
    offset_ms = (node.start_ns - origin_ns) / 1e6
    parts = [name, f"[cyan]{float(record.get('duration_ms') or 0):.1f} ms[/]", f"[dim]+{offset_ms:.1f} ms[/]"]
    shown = [f"{key.removeprefix('drctl.')}={value}" for key, value in attributes.items() if key.startswith("drctl.")]
    workflow = attributes.get(WORKFLOW_ATTRIBUTE)
    if workflow is not None and workflow != parent_workflow:
        shown.insert(0, f"workflow={workflow}")
    if shown:
        parts.append(f"[dim]{escape(' '.join(shown))}[/]")
    if record.get("status") == "ERROR" and record.get("status_description"):
        parts.append(f"[red]{escape(str(record['status_description'])[:200])}[/]")
    return "  ".join(parts)


def render_trace(trace_id: str, roots: list[SpanNode], workflow_id: str) -> Tree:
    """One trace as a rich tree; durations in ms, each span's start after the trace's first."""
    origin = min((r.start_ns for r in roots), default=0)
    tree = Tree(f"trace [bold]{trace_id}[/]")

    def add(branch: Tree, node: SpanNode, parent_workflow: str | None) -> None:
        child = branch.add(_label(node, origin, workflow_id, parent_workflow))
        workflow = (node.record.get("attributes") or {}).get(WORKFLOW_ATTRIBUTE, parent_workflow)
        for grandchild in node.children:
            add(child, grandchild, workflow)

    for root in roots:
        add(tree, root, None)
    return tree


def trace_json(trace_id: str, roots: list[SpanNode]) -> dict[str, Any]:
    def one(node: SpanNode) -> dict[str, Any]:
        record = node.record
        return {
            "name": record.get("name"),
            "span_id": record.get("span_id"),
            "service": record.get("service"),
            "start_ns": record.get("start_ns"),
            "duration_ms": record.get("duration_ms"),
            "status": record.get("status"),
            "attributes": record.get("attributes") or {},
            "children": [one(c) for c in node.children],
        }

    return {"trace_id": trace_id, "spans": [one(r) for r in roots]}


def show_trace(folder: Path, workflow_id: str, as_json: bool) -> None:
    spans = read_spans(folder)
    if not spans:
        fail(f"no spans in {folder}: tracing wrote nothing there. {HOW_TO_TURN_ON}", EXIT_FAILED)
    trees = traces_of(spans, workflow_id)
    if not trees:
        count = len({s["trace_id"] for s in spans})
        fail(
            f"no span of workflow {workflow_id!r} in {folder} ({len(spans)} spans of {count} traces). A run "
            "started where tracing is off, or one whose spans were rotated out, has none. " + HOW_TO_TURN_ON,
            EXIT_FAILED,
        )
    if as_json:
        body = {"workflow_id": workflow_id, "traces": [trace_json(t, roots) for t, roots in trees.items()]}
        print(json.dumps(body, indent=2))
        return
    for trace_id, roots in trees.items():
        out.print(render_trace(trace_id, roots, workflow_id))


def trace(
    workflow_id: Annotated[str, typer.Argument(help="a runbook's workflow id, e.g. failover-llama-2-7b-llama-2-7b-0")],
    as_json: Annotated[bool, typer.Option("--json", help="the tree as JSON")] = False,
    state_dir: StateOption = None,
) -> None:
    """Print the trace of one runbook as a tree with durations: the trigger (alert, prober, CLI), the
    workflow, each activity and platform call. Reads the spans file in the state folder."""
    settings = make_settings(state_dir=state_dir)
    show_trace(traces_dir(settings.state_dir), workflow_id, as_json)
