"""The one contract every command that writes follows for an output that already exists, in the same words:

- absent: computed fresh;
- complete, made with the same resolved settings: `up to date: PATH`, nothing recomputed;
- partial, same settings: resumed, saying `resuming: N of M done`;
- complete or partial with other settings: refused in one line naming each differing setting (old → new) and
  `--force` (the API's force=True). Where a setting differs only because `auto` resolved otherwise (another
  CPU kind), the line says so. With force the old output stays until the new one is complete (`target`).

Settings are plain dicts of resolved values (what the output records); `decide` compares them. The lines it
says go to stderr through `say`, the one channel a stage's status lines take, so the CLI needs no parsing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from featx.core import progress
from featx.core.atomic import make_dirs
from featx.core.configs import show
from featx.core.errors import FeatxError

FORCE = "--force"
Action = Literal["fresh", "up to date", "resume"]


def say(line: str) -> None:
    """A status line of the output contract (`up to date: ...`, `resuming: ...`) or of the data a stage reads, on
    stderr; nothing under the CLI's --quiet (featx.core.progress.quiet), like progress."""
    if not progress.quiet:
        print(f"featx: {line}", file=sys.stderr, flush=True)


def differences(
    old: Mapping,
    new: Mapping,
    *,
    auto: Mapping[str, str] = {},
    secondary: Sequence[str] = ("dataset_fingerprint", "heads", "run_records"),
) -> list[str]:
    """`name old → new` for each setting that differs; `auto` maps a setting to the option that was `auto` in
    both runs, so that a difference in what auto became on this machine is named as such. `secondary` settings
    (hashes, a probe's list of heads: what follows from the others) are named only when nothing plainer differs."""
    out = []
    for k in [k for k in new if k in old] + [k for k in old if k not in new]:
        if old.get(k) != new.get(k):
            note = f" ({auto[k]} auto resolves to {show(new.get(k))} on this CPU)" if k in auto else ""
            out.append((k, f"{k} {show(old.get(k))} → {show(new.get(k))}{note}"))
    plain = [line for k, line in out if k not in secondary]
    return plain or [line for _, line in out]


def refusal(path: str | Path, diffs: Sequence[str], *, partial: bool) -> FeatxError:
    what = "a partial output" if partial else "an output"
    return FeatxError(
        f"{path}: holds {what} made with other settings ({'; '.join(diffs)}); pass {FORCE} to "
        "replace it (the old one stays until the new one is complete) or choose another --out"
    )


@dataclass
class Existing:
    """What is at an output path: the settings it was made with, whether it is complete, how much is done."""

    settings: dict | None  # None: nothing there
    complete: bool = False
    done: int = 0
    total: int = 0
    unit: str = ""
    auto: dict = field(default_factory=dict)


def decide(
    path: str | Path, have: Existing, want: Mapping, *, force: bool = False, auto: Mapping[str, str] = {}
) -> Action:
    """Apply the contract: what a stage does with `path`, given what is there and the settings it would make.
    Says `up to date` / `resuming` itself; raises the one-line refusal; `force` turns only a refusal into a
    fresh computation, so a forced run that was interrupted resumes under the same command."""
    if have.settings is None:
        return "fresh"
    diffs = differences(have.settings, want, auto=auto)
    if diffs and not force:
        raise refusal(path, diffs, partial=not have.complete)
    if diffs:
        return "fresh"
    if have.complete:
        say(f"up to date: {path}")
        return "up to date"
    say(f"resuming: {have.done} of {have.total}{' ' + have.unit if have.unit else ''} done")
    return "resume"


def target(out: str | Path, *, forced: bool) -> Path:
    """The folder a stage writes: `out`, or for a forced run over an existing `out` a staging folder beside it
    (`promote` moves it into place once complete), so an interrupted forced run loses nothing. A staging folder
    a killed forced run left is reused: the stage's own contract resumes or replaces it."""
    out = Path(out)
    return out.with_name(out.name + ".new") if forced and out.exists() else out


def promote(folder: Path, out: str | Path) -> None:
    """Put the complete `folder` (from `target`) in `out`'s place; the old output goes only now."""
    out = Path(out)
    if folder == out:
        return
    if not out.exists():
        os.replace(folder, out)
        return
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(folder, out)
    shutil.rmtree(old)


def resume_hint(argv: Sequence[str], *, prog: str = "featx") -> str:
    """The exact command that resumes an interrupted one (for the CLI to print after Ctrl-C): the same arguments,
    `--force` included, since force only replaces an output of other settings and a forced run's own partial
    output has the new ones."""
    return "resume with: " + shlex.join([prog, *argv])


# --- whole-folder outputs (predict, report): recomputed in full, written beside, swapped in when complete ---

FOLDER_RECORD = ".featx-output.json"  # the settings a predict or report folder was made with
FOLDER_FILES = ("results.json", "predictions.csv", "report.json", "report.html")  # what marks one of 0.2


def folder_settings(settings: Mapping, runs: Sequence[str | Path]) -> dict:
    """A folder output's settings plus what each run it reads holds now (a hash of its run.json), so that a run
    trained again since makes the output out of date instead of up to date."""
    held: dict[str, str | None] = {}
    for run in runs:
        try:
            held[str(run)] = hashlib.sha256((Path(run) / "run.json").read_bytes()).hexdigest()[:16]
        except OSError:
            held[str(run)] = None  # the stage itself says what is wrong with the run
    return json.loads(json.dumps({**settings, "run_records": held}))


def staging_folder(out: str | Path, settings: Mapping, *, force: bool) -> Path | None:
    """The contract for a stage that writes a whole folder: None when `out` holds an output of the same settings
    (`up to date` said); else the empty folder beside `out` to write into and hand to `finish_folder`. A folder of
    other settings is refused unless `force`; one featx 0.2 wrote (no record) is replaced as 0.2 would have; a
    folder of other files is refused, never replaced."""
    out = Path(out)
    record = out / FOLDER_RECORD
    have = Existing(None)
    if record.is_file():
        have = Existing(json.loads(record.read_text())["settings"], complete=True)
    elif out.is_dir() and any(out.iterdir()) and not any((out / f).exists() for f in FOLDER_FILES):
        raise FeatxError(f"--out {out}: holds files featx did not write; choose another --out")
    if decide(out, have, settings, force=force) == "up to date":
        return None
    changed = differences(have.settings, settings) if have.settings is not None else []
    if changed:  # forced: say what the new output changes
        say(f"replacing {out} ({'; '.join(changed)})")
    make_dirs(out.parent, option="--out", path=out)  # a bad --out is named as given, not as its staging folder
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted run's: recomputed in full
    return staging


def finish_folder(staging: Path, out: str | Path, settings: Mapping) -> None:
    """Record the settings in the complete `staging` folder and put it in `out`'s place: no file of an earlier
    output stays beside the new ones."""
    (staging / FOLDER_RECORD).write_text(json.dumps({"settings": settings}, indent=1))
    promote(staging, out)
