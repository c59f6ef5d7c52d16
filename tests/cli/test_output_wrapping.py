"""Piped output and ``--json`` are never broken into lines: rich hard-wrapped errors at 80 columns
when stderr was not a terminal, so a script (or ``grep``) saw half a message."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from rich.table import Table

from drctl.cli.common import PIPED_WIDTH, make_console

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dr-policy.yaml"
LONG_MODEL = "a-model-with-a-name-long-enough-to-pass-eighty-columns-" + "x" * 60


def test_an_error_through_a_pipe_is_one_line() -> None:
    command = [sys.executable, "-c", "from drctl.cli.app import main; main()", "failover", LONG_MODEL, "x-0"]
    done = subprocess.run(
        [*command, "--policy", str(EXAMPLE)], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert done.returncode == 2, done.stderr
    expected = f"error: unknown model {LONG_MODEL!r}; the policy has: llama-2-7b, mistral-7b, gpt-4-8b"
    assert done.stderr.splitlines() == [expected]


def test_a_piped_console_wraps_no_line_and_no_json() -> None:
    file = io.StringIO()
    console = make_console(file=file)
    long_line = "word " * 100
    console.print(long_line.strip(), highlight=False)
    console.print_json(json.dumps({"reason": "z" * 500, "nested": {"list": ["y" * 300]}}))
    first, *rest = file.getvalue().splitlines()
    assert first == long_line.strip()
    assert json.loads("\n".join(rest)) == {"reason": "z" * 500, "nested": {"list": ["y" * 300]}}


def test_a_piped_console_still_lays_tables_out() -> None:
    file = io.StringIO()
    console = make_console(file=file)
    table = Table()
    table.add_column("model")
    table.add_row("llama-2-7b")
    console.print(table)
    assert max(len(line) for line in file.getvalue().splitlines()) <= PIPED_WIDTH
    assert "llama-2-7b" in file.getvalue()


def test_a_piped_json_output_of_a_command_parses(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "from drctl.cli.app import main; main()", "policy", "explain", str(EXAMPLE)]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [item["model"] for item in json.loads(done.stdout)] == ["llama-2-7b", "mistral-7b", "gpt-4-8b"]


def test_the_command_list_shows_each_summary_reflowed() -> None:
    """A command's summary wrapped in its docstring is one paragraph in ``drctl --help``'s list,
    not the docstring's line breaks (``one_line_summaries``)."""
    from typer.testing import CliRunner

    from drctl.cli.app import app

    done = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert done.exit_code == 0, done.output
    rows = [line for line in done.output.splitlines() if line.strip(" │").startswith(("trace ", "failback "))]
    assert len(rows) == 2, done.output
    assert "the trigger (alert, prober, CLI), the workflow, each activity" in rows[0]
    assert "Serving stays where the failover put it." in rows[1]
