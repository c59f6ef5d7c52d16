"""Write a drill's report: JSON (everything), Markdown (the table people read) and a PNG timeline
(requests per 100 ms, succeeded and failed, with the fault and the runbook's steps marked)."""

from __future__ import annotations

import json
from pathlib import Path

from drctl.payloads import DrillReport


def seconds(ms: float | None) -> str:
    """Milliseconds as seconds for people, or a dash when not measured."""
    return "—" if ms is None else f"{ms / 1000:.3f} s"


def markdown(report: DrillReport) -> str:
    t = report.target
    m = report.measurement
    lines = [
        f"# Drill {report.drill_id}: {report.scenario}",
        "",
        f"Target: **{t.model}**, serving instance `{t.instance}`"
        + (f" on {t.gpu} ({t.node}, {t.zone})" if t.gpu else ""),
        "",
        f"Result: **{'PASSED' if report.passed else 'FAILED'}**"
        + (f" — error: {report.error}" if report.error else ""),
        "",
    ]
    if m is not None:
        lines += [
            f"Fault: {m.fault.detail} at {m.fault.injected_at.isoformat()}",
            "",
            "| figure | measured | policy | seed SLA |",
            "|---|---|---|---|",
            f"| detection | {seconds(m.detection_ms)} | | {seconds(t.sla_detection_ms)} |",
            f"| switch | {seconds(m.switch_ms)} | | {seconds(t.sla_switch_ms)} |",
            f"| total RTO | {seconds(m.rto_ms)} | {seconds(t.policy_rto_ms)} | {seconds(t.sla_rto_ms)} |",
            f"| redundancy restored | {seconds(m.redundancy_ms)} | | |",
            *(
                [f"| zone failover started | {seconds(m.zone_failover_ms)} | | |"]
                if m.zone_failover_ms is not None
                else []
            ),
            f"| requests failed | {m.failed_requests} of {m.requests} after the fault | | |",
            f"| in flight at the fault, lost | {m.lost_in_flight} | | in-flight requests may be lost |",
            f"| streams cut at the fault | {m.streams_cut} | | a started response cannot be retried |",
            f"| streams after the fault: failed, served by the replacement | {m.streams_failed} of {m.streams}, "
            f"{m.streams_by_replacement} | | |",
            f"| slowest successful request | {seconds(m.worst_latency_ms)} | | |",
            "",
            f"Replacement: `{m.promoted or '-'}` ({m.promoted_tier or '-'})",
            "",
            "## Verdicts",
            "",
            *[f"- {name}: {verdict}" for name, verdict in report.verdicts.items()],
            "",
            "## Runbook steps (ms from the fault)",
            "",
            "| at | step | took | runbook |",
            "|---|---|---|---|",
            *[
                f"| {mark.at_ms:.0f} | {mark.step}{'' if mark.ok else ' (failed)'} | {mark.duration_ms:.0f} ms | "
                f"{mark.runbook} |"
                for mark in m.marks
            ],
            "",
        ]
        if m.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in m.notes], ""]
    lines += ["## Restored", "", *[f"- {r}" for r in report.restore or ["nothing to restore"]], ""]
    return "\n".join(lines)


def timeline_png(report: DrillReport, path: Path) -> None:
    """Top: requests per 100 ms (succeeded green, failed red) with the fault, detection, serving and
    redundancy marked. Bottom: the runbooks on the same time axis, one row per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report.measurement
    assert m is not None
    fig, (ax, steps_ax) = plt.subplots(
        2, 1, figsize=(12, 7), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    xs = [b.t_ms / 1000 for b in m.buckets]
    ok = [b.ok for b in m.buckets]
    failed = [b.failed for b in m.buckets]
    ax.bar(xs, ok, width=0.09, align="edge", color="#2e7d32", label="succeeded")
    ax.bar(xs, failed, width=0.09, align="edge", bottom=ok, color="#c62828", label="failed")
    figures = [("fault", 0.0, "black"), ("detected", m.detection_ms, "#6a1b9a"), ("serving", m.rto_ms, "#1565c0")]
    figures.append(("redundancy back", m.redundancy_ms, "#ef6c00"))
    for label, ms, colour in figures:
        if ms is not None:
            for axis in (ax, steps_ax):
                axis.axvline(ms / 1000, color=colour, linestyle="--" if ms else "-", linewidth=1.1)
            ax.plot([], [], color=colour, linestyle="--" if ms else "-", label=f"{label} {ms / 1000:.2f} s")
    ax.set_ylabel("requests per 100 ms")
    ax.legend(loc="lower left", fontsize=8, ncol=3)
    title = f"{report.scenario}: {report.target.model} ({report.target.instance}) — "
    t = report.target
    title += f"RTO {seconds(m.rto_ms)} vs policy {seconds(t.policy_rto_ms)}, seed {seconds(t.sla_rto_ms)}; "
    title += f"{m.failed_requests} of {m.requests} requests failed"
    ax.set_title(title, fontsize=9)
    rows: list[str] = []
    for mark in m.marks:
        label = mark.step if mark.runbook == report.target.instance else f"{mark.step} ({mark.runbook})"[:60]
        if label not in rows:
            rows.append(label)
        y = rows.index(label)
        colour = "#1565c0" if mark.ok else "#c62828"
        width = max(mark.duration_ms / 1000, 0.004)
        steps_ax.broken_barh([(mark.at_ms / 1000, width)], (y - 0.35, 0.7), color=colour)
    steps_ax.set_yticks(range(len(rows)), rows, fontsize=7)
    steps_ax.invert_yaxis()
    steps_ax.set_xlabel("seconds from the fault")
    steps_ax.set_title("runbooks (failover steps of the serving instance; other runbooks as they start)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: DrillReport, folder: Path) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` and (with a measurement) ``timeline.png`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": str(folder / "report.json"), "markdown": str(folder / "report.md")}
    if report.measurement is not None and report.measurement.buckets:
        timeline_png(report, folder / "timeline.png")
        files["png"] = str(folder / "timeline.png")
    report = report.model_copy(update={"files": files})
    Path(files["markdown"]).write_text(markdown(report), encoding="utf-8")
    Path(files["json"]).write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return files
