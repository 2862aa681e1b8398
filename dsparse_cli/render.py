"""Every table the commands show, built from plain documents (probe results, plan, board rows,
job summary). Nothing here reads files or reaches boards; callers print what it returns.

Tables fit the console they are printed on: every column when the table fits (or `wide` is set),
else only its essential columns. Cells never wrap or get cut. A failed board's error is a line of
its own under the table; it stays one line when printed with `console.print(..., soft_wrap=True)`.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from dsparse_cli.contract import BoardStatus
from dsparse_cli.sizes import format_rate, format_size

# Set by the app's --wide: every table shows all its columns, however wide (print with soft_wrap=True
# so that lines wider than the terminal are not cropped).
wide: bool = False

_STATE_COLOURS = {BoardStatus.FINISHED: "green", BoardStatus.FAILED: "red", BoardStatus.STALE: "yellow",
                  BoardStatus.UNREACHABLE: "red"}
_UNLIMITED = 100_000  # a width no table reaches: measuring with it gives a table's natural width


class FitTable:
    """A table that shows as many columns as fit the console: all of them, else its `essential`
    ones (in order of importance: the last is dropped first while even those do not fit).
    Rows and `caption` may be added until it is printed; it is laid out anew at every render."""

    def __init__(self, title: str, columns: Iterable[str], essential: Iterable[str]):
        self.title, self.columns, self.essential = title, tuple(columns), tuple(essential)
        self.caption: str | None = None
        self.rows: list[tuple] = []

    def add_row(self, *cells) -> None:
        self.rows.append(cells)

    def table(self, columns: Iterable[str] | None = None) -> Table:
        """The Rich table of the given columns (all by default), in the table's own order."""
        keep = [i for i, c in enumerate(self.columns) if columns is None or c in columns]
        t = Table(title=self.title, title_justify="left", caption=self.caption)
        for i in keep:
            t.add_column(self.columns[i], no_wrap=True)
        for row in self.rows:
            t.add_row(*(row[i] for i in keep))
        return t

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if wide:  # every column at its natural width, however wide
            full = self.table()
            yield from console.render(full, options.update_width(_natural_width(console, options, full)))
            return
        choices = [None] + [self.essential[:n] for n in range(len(self.essential), 1, -1)]
        for columns in choices:
            table = self.table(columns)
            if _natural_width(console, options, table) <= options.max_width:
                break
        yield table  # the narrowest when none fits: Rich shortens its cells


def _natural_width(console: Console, options: ConsoleOptions, table: Table) -> int:
    """The width a table takes when no cell is wrapped or shortened."""
    return Measurement.get(console, options.update_width(_UNLIMITED), table).maximum


def error_lines(errors: Iterable[tuple[str, str]]) -> list[Text]:
    """One `board: message` line per failed board, plain text (no markup in the message)."""
    return [Text.assemble((name, "red"), ": ", message) for name, message in errors]


def probe_table(cluster: str, infos) -> Group:
    """The probed boards; a failed board's row says `failed` and its error follows the table."""
    t = FitTable(f"cluster {cluster}", ("board", "kind", "model", "arch", "cpus", "mem total", "available",
                                        "cgroup limit", "usable", "torch", "address", "link"),
                 essential=("board", "kind", "usable", "address", "torch"))
    for i in infos:
        if not i.ok:
            t.add_row(Text(i.name, "red"), Text("failed", "red"), *[""] * 10)
            continue
        t.add_row(i.name, i.kind or "-", i.model or "-", i.arch or "-", str(i.cpus_effective or i.cpus or "-"),
                  format_size(i.mem_total_bytes), format_size(i.mem_available_bytes),
                  format_size(i.cgroup_limit_bytes), f"[bold]{format_size(i.usable_memory_bytes)}[/]",
                  i.torch or "[yellow]missing[/]", f"{i.address or '-'} ({i.iface or '-'})",
                  format_rate(i.link_bytes_per_s))
    return Group(t, *error_lines((i.name, i.error or "failed") for i in infos if not i.ok))


def plan_view(doc: dict) -> Group:
    """The devices' table (with measured vs predicted after --verify), then the aggregation groups."""
    names = {u["index"]: u["name"] for u in doc["units"]}
    verify = any("measured_peak_bytes" in d for d in doc["devices"])
    t = FitTable(f"plan: {doc['model']}, batch {doc['batch_size']}, {doc['optimizer']} ({len(doc['units'])} units)",
                 ("rank", "board", "budget", "predicted peak", "full-update peak", "training saving", "units updated",
                  "link", "wire/step")
                 + (("measured training / predicted",) if verify else ()),
                 essential=("rank", "board", "units updated", "budget", "predicted peak"))
    for d in doc["devices"]:
        full_t, pred_t = d.get("full_update_training_bytes"), d.get("predicted_training_bytes")
        units = d["units"]
        first = "" if not units else f" ({names[units[0]]})" if len(units) == 1 else \
            f" ({names[units[0]]}..{names[units[-1]]})"
        row = [str(d["rank"]), d["name"], format_size(d["budget_bytes"]), format_size(d["predicted_peak_bytes"]),
               format_size(d["full_update_peak_bytes"]), _saving(pred_t, full_t), unit_ranges(units) + first,
               format_rate(d.get("link_bytes_per_s")), _wire(d)]
        if verify:
            m, ref = d.get("measured_training_bytes"), d.get("verify_predicted_training_bytes") or pred_t
            row.append(f"{format_size(m)} / {format_size(ref)} ({100 * (m / ref - 1):+.1f}%)" if m and ref else "-")
        t.add_row(*row)
    parts = [t]
    if doc.get("launcher_bytes"):
        who = "torchrun's agent" if doc.get("launcher", "torchrun") == "torchrun" else "dsparse's launcher"
        parts.append(Text(f"peaks are the worker's; each budget also holds {who} "
                          f"({format_size(doc['launcher_bytes'])} of private memory)"))
    fast = [d for d in doc["devices"] if d.get("allocator") == "fast"]
    if fast:
        parts.append(Text(f"allocator fast on {', '.join(d['name'] for d in fast)}: glibc's defaults, faster steps; "
                          f"their figures hold what that added to a full update here "
                          f"({format_size(fast[0]['predicted_breakdown'].get('allocator', 0))})"))
    if doc.get("predicted_agg_s_per_step") is not None:
        parts.append(Text(f"objective {doc.get('objective', 'memory')}: predicted aggregation "
                          f"{doc['predicted_agg_s_per_step']:.3f} s/step; a full update's ring all-reduce "
                          f"(what DDP sends) {doc['ddp_agg_s_per_step']:.3f} s/step"))
    if doc.get("predicted_step_s") is not None:
        slowest = max(doc["devices"], key=lambda d: d.get("predicted_compute_s_per_step", 0))
        parts.append(Text(f"predicted step {doc['predicted_step_s']:.3f} s: slowest compute "
                          f"{slowest['predicted_compute_s_per_step']:.3f} s ({slowest['name']}) + aggregation"))
    g = FitTable("aggregation groups (created in this order on every rank)",
                 ("group", "op", "ranks", "root", "units", "every", "bytes/step"),
                 essential=("group", "op", "ranks", "units", "bytes/step"))
    for grp in doc["groups"]:
        g.add_row(str(grp.get("id", "")), grp["op"], ",".join(map(str, grp["ranks"])), str(grp.get("root", "")),
                  unit_ranges(grp["units"]), str(grp.get("sync_every", 1)) if grp["op"] == "broadcast" else "1",
                  format_size(grp["bytes_per_step"]))
    return Group(*parts, g)


def _wire(d: dict) -> str:
    """A board's predicted traffic per step: the busier direction, and its seconds if the link is known."""
    busier = max(d.get("predicted_sent_bytes_per_step") or 0, d.get("predicted_recv_bytes_per_step") or 0)
    seconds = d.get("predicted_link_s_per_step")
    return format_size(busier) + (f", {seconds:.3f} s" if seconds is not None else "")


def train_summary(summary: dict) -> FitTable:
    """`dsparse train`'s last word: each board's measured memory and traffic against the plan."""
    accuracy = summary["accuracy"] if summary["accuracy"] is not None else "-"
    t = FitTable(f"job {summary['job']}: {summary['state']}, accuracy {accuracy}",
                 ("board", "units", "peak training mem", "predicted", "full update", "saving", "agg ms/step",
                  "bytes/step"),
                 essential=("board", "units", "peak training mem", "predicted", "saving"))
    for b in summary["boards"]:
        full, predicted = b.get("full_update_training_bytes"), b.get("predicted_training_bytes")
        t.add_row(b["name"], unit_ranges(b["units"]), format_size(b.get("peak_memory_bytes")),
                  format_size(predicted), format_size(full), _saving(predicted, full),
                  _fmt(b.get("agg_ms_per_step"), ".1f"), format_size(b.get("bytes_per_step")))
    return t


def board_table(title: str, rows: list[dict], budgets: Mapping[str, int | None] | None = None) -> FitTable:
    """One row per board of a running job (the follower's live view, `dsparse status`). A board's
    budget is budgets[name] when given, else the row's own budget_bytes. Errors are not cells:
    the caller prints them under the table (`error_lines`)."""
    t = FitTable(title, ("board", "state", "epoch", "step", "loss", "acc", "samples/s", "peak / budget",
                         "agg ms/step", "bytes/step", "hb age"),
                 essential=("board", "state", "step", "peak / budget", "loss", "acc"))
    for r in rows:
        colour = _STATE_COLOURS.get(r["state"], "")
        budget = budgets.get(r["name"]) if budgets is not None else r.get("budget_bytes")
        t.add_row(r["name"], f"[{colour}]{r['state']}[/]" if colour else r["state"],
                  _epoch(r), _step(r), _fmt(r.get("loss"), ".3f"),
                  _fmt(r.get("accuracy"), ".3f"), _fmt(r.get("samples_per_s"), ".1f"),
                  f"{format_size(r.get('peak_process_bytes'))} / {format_size(budget)}",
                  _fmt(r.get("agg_ms_per_step"), ".1f"), format_size(r.get("bytes_per_step")),
                  _fmt(r.get("heartbeat_age_s"), ".0f"))
    return t


def status_table(doc: dict) -> FitTable:
    """`dsparse status`: the board table under a title that counts the boards in each state."""
    counts = Counter(b["state"] for b in doc["boards"])
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return board_table(f"job {doc['job']}: {doc['state']} ({parts})", doc["boards"])


def unit_ranges(units: list[int]) -> str:
    """[3,4,5,9] -> '3-5,9'."""
    out, start = [], None
    for i, u in enumerate(units):
        if start is None:
            start = u
        if i + 1 == len(units) or units[i + 1] != u + 1:
            out.append(f"{start}" if start == u else f"{start}-{u}")
            start = None
    return ",".join(out) or "none"


def _saving(predicted, full) -> str:
    return f"{100 * (1 - predicted / full):.0f}%" if full and predicted else "-"


def _epoch(r: dict) -> str:
    return f"{r['epoch']}/{r['epochs']}" if r.get("epoch") and r.get("epochs") else _fmt(r.get("epoch"))


def _step(r: dict) -> str:
    """The step within the whole run (the per-epoch step restarts at every epoch)."""
    if r.get("global_step") is not None and r.get("total_steps"):
        return f"{r['global_step']}/{r['total_steps']}"
    return _fmt(r.get("step"))


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def preflight_table(columns: tuple, rows: list[tuple], problems: list[str]) -> FitTable:
    """The preflight of every board before a launch; under it, each problem on its own line."""
    t = FitTable("preflight (nothing was started)", columns, essential=columns)
    for row in rows:
        t.add_row(*(escape(str(cell)) for cell in row))
    t.caption = "\n".join(escape(p) for p in problems)
    return t
