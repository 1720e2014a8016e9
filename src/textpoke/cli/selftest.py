"""``textpoke selftest``: check on a private target that everything textpoke needs works here.

The checks (and rich) load when the command runs, not when the CLI starts."""

from __future__ import annotations

import click

from .._errors import TextpokeError


@click.command("selftest", short_help="Check that everything textpoke needs works on this machine.")
def command() -> None:
    """Start a private target and check ptrace, /proc/PID/mem, shared memory,
    membarrier and the resident handler's int3 emulation (exact counts)."""
    from rich.console import Console
    from rich.table import Table

    from ..selftest import Status, run_selftest

    style = {Status.OK: "green", Status.FAIL: "bold red", Status.SKIP: "yellow"}
    console = Console()
    with console.status("textpoke selftest") as status:
        checks = run_selftest(progress=lambda what: status.update(f"textpoke selftest: {what}"))
    table = Table(title="textpoke selftest", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in checks:
        table.add_row(check.name, f"[{style[check.status]}]{check.status.value}[/]", check.detail)
    console.print(table)
    failed = [check.name for check in checks if check.status is Status.FAIL]
    if failed:
        raise TextpokeError(
            f"selftest: {len(failed)} of {len(checks)} checks failed: {', '.join(failed)}",
            hint="textpoke cannot patch processes safely on this machine until these work",
        )
    console.print(f"all {len(checks)} checks passed")
