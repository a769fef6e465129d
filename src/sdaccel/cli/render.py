"""Engine events -> Rich output on stderr: a live step bar on a terminal, one line per image
always (so logs and CI output stay readable)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from sdaccel.events import BatchDone, BatchStarted, Event, PlanDecided, StepDone, Warning
from sdaccel.outputs import describe_compute, describe_plan

# Adaptive compute shows one line per image, what ran at each step, for batches up to this size.
MAX_LIVE_ROWS = 8


class ProgressRenderer:
    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task = None
        self._rows: list = []  # per-image tasks showing the per-step decisions
        self._codes: list[str] = []

    def __call__(self, event: Event) -> None:
        if print_notice(self.console, event) or not self.console.is_terminal:
            return
        elif isinstance(event, BatchStarted):
            self._start(event)
        elif isinstance(event, StepDone) and self._progress is not None:
            self._progress.update(self._task, completed=event.step, total=event.total_steps)
            self._show_decisions(event)
        elif isinstance(event, BatchDone):
            self.close()

    def _show_decisions(self, event: StepDone) -> None:
        """Adaptive compute: each image's letters so far (F full, C cached, f/c without the
        unconditional half, - skipped) and its cost, one line per image."""
        if not event.costs or len(event.decisions) > MAX_LIVE_ROWS:
            return
        if not self._rows:
            self._codes = [""] * len(event.decisions)
            self._rows = [self._progress.add_task(f"  image {k}", total=None, image_row=True,
                                                  start=False)
                          for k in range(len(event.decisions))]
        for k, (letter, cost) in enumerate(zip(event.decisions, event.costs, strict=True)):
            self._codes[k] += letter
            self._progress.update(self._rows[k], description=(
                f"  image {k}: {self._codes[k]}  cost {cost:.2f}"))

    def _start(self, event: BatchStarted) -> None:
        self.close()
        label = event.prompts[0] if len(event.prompts) == 1 else f"{len(event.prompts)} prompts"
        self._rows = []
        self._progress = Progress(
            TextColumn("{task.description}"),
            *(_BatchOnly(c) for c in (BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                      TimeElapsedColumn())),
            console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            f"{escape(label[:40])} x{event.batch_size}", total=event.steps
        )

    def image_saved(self, record: dict, prompt: str) -> None:
        compute = describe_compute(record["cost"], record["steps"], record["decisions"])
        compute = f"{compute}  " if compute else ""
        self.console.print(
            f"[green]saved[/] {escape(str(record['path']))}  seed {record['seed']}  "
            f"{record['steps']} steps  {compute}{record['seconds']:.2f} s  "
            f"[dim]{escape(prompt[:60])}[/]",
            highlight=False,
        )

    def summary(self, records: list[dict]) -> None:
        """After an adaptive run: what each image spent, and what it saved."""
        if any(set(r.get("decisions", "F")) - {"F"} for r in records):
            costs = [r["cost"] for r in records]
            plain = sum(r["steps"] for r in records)
            self.console.print(
                f"adaptive compute: cost per image {[round(c, 2) for c in costs]}; "
                f"{sum(costs):.2f} of {plain} full-UNet equivalents "
                f"({1 - sum(costs) / plain:.0%} saved)", highlight=False)
        plans = [r["plan"] for r in records if r.get("plan")]
        if not plans:
            return
        steps = [r["steps"] for r in records]
        mean_nfe = sum(r["nfe"] for r in records) / len(records)
        budget = sum(p["max_steps"] for p in plans)
        saved = 1 - sum(steps) / budget
        self.console.print(
            f"adaptive: steps per image {steps}; mean NFE {mean_nfe:.1f}; "
            f"{sum(steps)} of {budget} max_steps steps ({saved:.0%} saved)", highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._rows = []


class _BatchOnly(ProgressColumn):
    """A column drawn for the batch's bar only, blank on the per-image decision lines."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task):
        return Text("") if task.fields.get("image_row") else self.column.render(task)


def print_notice(console: Console, event: Event) -> bool:
    """Warnings and adaptive decisions get a line of their own; True if `event` was one."""
    if isinstance(event, Warning):
        console.print(f"[yellow]Warning:[/] {escape(event.message)}", highlight=False)
    elif isinstance(event, PlanDecided):
        console.print(f"[cyan]plan[/] seed {event.seed}: {describe_plan(event)}  "
                      f"[dim]{escape(event.prompt[:60])}[/]", highlight=False)
    else:
        return False
    return True


class JobsProgress:
    """A prompts-file run, drawn by the main process only: one bar for the images of every
    process (fed from their manifests), a line per saved image, the engine's notices."""

    def __init__(self, console: Console, total: int, done: int, processes: int) -> None:
        self.console = console
        self.records: list[dict] = []
        self._progress: Progress | None = None
        if console.is_terminal:
            self._progress = Progress(
                TextColumn(f"images ({processes} process{'es' if processes > 1 else ''})"),
                BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=total, completed=done)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Warning):  # plans: in the saved lines, for every process's images
            print_notice(self.console, event)

    def image_saved(self, record: dict, out_dir: Path) -> None:
        self.records.append(record)
        seconds = "" if record.get("seconds") is None else f"{record['seconds']:.2f} s  "
        plan = record.get("plan")
        plan = f"({describe_plan(SimpleNamespace(**plan))})  " if plan else ""
        compute = describe_compute(record["cost"], record["steps"], record["decisions"])
        plan += f"{compute}  " if compute else ""
        self.console.print(
            f"[green]saved[/] {escape(str(out_dir / record['file']))}  seed {record['seed']}  "
            f"{record['steps']} steps  {plan}{seconds}[dim]{escape(record['prompt'][:60])}[/]",
            highlight=False,
        )
        if self._progress is not None:
            self._progress.advance(self._task)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
