"""What a person sees of long work: a tqdm bar on a terminal, plain lines in a log, nothing when quiet.

A bar redraws itself with carriage returns, which a log file keeps as one endless line; where stderr is not a
terminal each bar prints one line when it starts, one each tenth of the way and one when it ends. The CLI's
`--quiet` sets `quiet`; an API caller passes `progress=False` to the stage instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm

quiet = False  # no bars and no progress lines at all: set once by the CLI's --quiet

LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
COUNT_FORMAT = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"  # the total is unknown


class _Lines(tqdm):
    """tqdm's counting, rates and postfix, written as whole lines each tenth of the total instead of a bar."""

    def __init__(self, *args, **kwargs):
        self._tenth, self._shown = -1, -1.0  # the last tenth and count printed
        super().__init__(*args, bar_format=LINE_FORMAT, mininterval=0, miniters=1, **kwargs)
        self.sp = None  # tqdm's close then leaves the stream alone: no '\r', no blank line

    def display(self, msg=None, pos=None) -> bool:
        tenth = int(10 * self.n / self.total) if self.total else 0
        if tenth > self._tenth:
            self._tenth = tenth
            self._line()
        return True

    def clear(self, nolock=False) -> None:  # tqdm.write clears bars before writing; a line needs nothing
        pass

    def close(self) -> None:
        if not self.disable and self.leave and self.n != self._shown:
            self._line()  # where it stopped: done, or interrupted part way
        super().close()

    def _line(self) -> None:
        self._shown = self.n
        self.bar_format = LINE_FORMAT if self.total else COUNT_FORMAT
        self.fp.write(f"{self}\n")
        self.fp.flush()


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: float | None = None,
    initial: float = 0,
    unit: str = "it",
    unit_scale: bool = False,
    leave: bool = True,
    enabled: bool = True,
) -> tqdm:
    """A progress bar on stderr: tqdm on a terminal, plain lines elsewhere, silent when not `enabled` or quiet.
    `initial` is the work already done, so a resumed run starts where the last one stopped."""
    kwargs = dict(
        desc=desc, total=total, initial=initial, unit=unit, unit_scale=unit_scale, leave=leave, file=sys.stderr
    )
    if quiet or not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    return (tqdm if bars_shown() else _Lines)(iterable, **kwargs)


def inform(line: str) -> None:
    """One information line on stderr (a choice `auto` made), silenced by --quiet."""
    if not quiet:
        print(f"featx: {line}", file=sys.stderr, flush=True)


def bars_shown() -> bool:
    """Whether to draw bars: for libraries (torch.hub's downloads) that only draw one or nothing."""
    return not quiet and sys.stderr.isatty()
