"""torch.compile for every stage that runs a network over many images: `compile = "auto" | "on" | "off"`.

`on` compiles with Inductor. A frozen backbone (extract, predict) is compiled with Inductor's freezing: under
inference mode its weights become constants, folded into the graph and pre-packed for oneDNN, where most of
the gain on CPU lies. Training (finetune) compiles without freezing, since its weights change. A compilation
that fails (no C++ compiler, an operator Inductor cannot lower) warns once and the work goes on eager.

`auto` for a frozen backbone measures (`auto_frozen`): it times a few batches eager, stays eager where the
whole job would take less than compiling does, else compiles, times the same batches compiled and keeps the
faster, since what compiling gains differs with the CPU, the precision and the model (0.74x eager to 3x).
For training, `auto` compiles when the job is long enough to repay the compilation (`choose_compile`).
Either way the choice is one information line (featx.core.progress.inform, silenced by --quiet), and torch's
and Inductor's own log lines are kept from the user (`torch_quiet`).

Inductor keeps what it compiled (its FX graph cache, on by default) under $TORCHINDUCTOR_CACHE_DIR, by default
`torchinductor_<user>` in the temporary directory (/tmp); a later run of the same model and shapes loads it
from there instead of compiling again. On CUDA the same code path runs; its gain there is unmeasured.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from featx.core.choices import COMPILE_MODES, CompileMode
from featx.core.errors import FeatxError, FeatxWarning
from featx.core.progress import inform

# The work (GFLOP, multiply-adds counted twice) past which compiling pays: about 40 s of compilation on 2 cores
# (MobileNetV2 and Inception-v3 alike; the graph's size, not its FLOPs, sets it) repaid by running 1.2-2x
# faster at a few hundred GFLOP/s. docs/results.md's "Compilation" section has the measurement.
BREAK_EVEN_GFLOP = 40_000.0


# Compiling a frozen CNN with freezing takes 20-60 s on 2 cores: a job shorter than this eager stays eager unmeasured
MIN_COMPILE_SECONDS = 20.0
TIMED_BATCHES = 2  # batches timed each way after one warm-up


class CompileWarning(FeatxWarning):
    """A line about compilation for the user (the CLI renders it as one line): that compiling failed."""


@contextlib.contextmanager
def torch_quiet() -> Iterator[None]:
    """torch's, Inductor's and torchao's own log lines and warnings kept from the user (compiling, quantizing)."""
    loggers = [logging.getLogger(n) for n in ("torch", "torchao")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torch(ao)?\..*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass(frozen=True)
class CompileChoice:
    compiled: bool
    why: str  # one line: the mode asked for and, for auto, what it chose and why


def choose_compile(mode: CompileMode, *, views: int, gflop_per_view: float) -> CompileChoice:
    """Whether to compile a job of `views` forward passes (image-views; a training step counts as 3) of a network
    costing `gflop_per_view`. Only `auto` looks at the job."""
    if mode not in COMPILE_MODES:
        raise FeatxError(f"--compile {mode}: choose one of {', '.join(COMPILE_MODES)}")
    if mode != "auto":
        return CompileChoice(mode == "on", f"--compile {mode}")
    work = views * gflop_per_view
    pays = work >= BREAK_EVEN_GFLOP
    return CompileChoice(
        pays,
        f"--compile auto: {'compiled' if pays else 'eager'}: {views:,} views x "
        f"{gflop_per_view:.3g} GFLOP = {work / 1000:.3g} TFLOP, "
        f"{'past' if pays else 'under'} the {BREAK_EVEN_GFLOP / 1000:g} TFLOP where "
        "compiling pays",
    )


def gflop_per_view(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """The model's forward cost on one size x size image (matmuls and convolutions), counted on one real pass."""
    counter = FlopCounterMode(display=False)
    training = model.training
    model.eval()  # a training-mode pass would move BatchNorm's running statistics
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size, device=device))
    model.train(training)
    return counter.get_total_flops() / 1e9


def decide(
    mode: CompileMode,
    model: torch.nn.Module,
    *,
    size: int,
    device: torch.device,
    views: int,
    passes: int = 1,
    quiet: bool = False,
) -> CompileChoice:
    """choose_compile for `views` inputs of this model (`passes` forward-equivalents each: 3 for a training
    step); the choice of `auto` is reported as one information line unless `quiet`."""
    cost = gflop_per_view(model, size, device) * passes if mode == "auto" else 0.0
    choice = choose_compile(mode, views=views, gflop_per_view=cost)
    if mode == "auto" and not quiet:
        inform(choice.why)
    return choice


class Guarded:
    """A compiled model that runs eager from the first failure of its compiled form on, with one warning.
    `rows` > 0 (frozen inference) feeds the compiled model batches of exactly that many rows, cutting larger
    ones and padding a short one with zeros, so it compiles once (each row's output depends on that row alone)."""

    def __init__(self, eager: Callable, compiled: Callable | None, rows: int = 0):
        self.eager, self.compiled, self.rows = eager, compiled, rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.eager(x)
        try:
            with torch_quiet():
                return self._run(x)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(
                f"--compile: compiling failed ({type(e).__name__}: {first[:200]}); running eager",
                CompileWarning,
                stacklevel=2,
            )
            self.compiled = None
            return self.eager(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        assert self.compiled is not None  # __call__ runs eager once it is None
        if not self.rows or len(x) == self.rows:
            return self.compiled(x)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        outs = []
        for part in x.split(self.rows):
            n = len(part)
            if n < self.rows:
                part = torch.cat([part, part.new_zeros((self.rows - n, *part.shape[1:]))])
            outs.append(self.compiled(part.contiguous(memory_format=layout))[:n])
        return torch.cat(outs)


def ran_compiled(model: Callable) -> str:
    """What ran, as records store it: "on" for a compiled model that has not fallen back to eager, else "off"."""
    return "on" if isinstance(model, Guarded) and model.compiled is not None else "off"


def compile_frozen(
    model: torch.nn.Module, choice: CompileChoice, *, rows: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A frozen (eval, no-grad) model as the choice says: compiled with Inductor's freezing, for calls under
    torch.inference_mode with `rows`-row batches (others are cut or padded to that), or the model itself."""
    if not choice.compiled:
        return model
    # freezing as an option of this compilation only, not a global Inductor setting that leaks into others
    return Guarded(model, torch.compile(model, dynamic=False, options={"freezing": True}), rows)


def _freeze(model: torch.nn.Module, rows: int) -> Callable:
    return compile_frozen(model, CompileChoice(True, "--compile on"), rows=rows)


@torch.inference_mode()
def _seconds_per_row(model: Callable, x: torch.Tensor, autocast: torch.dtype | None) -> float:
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        model(x)  # warm-up: a compiled model compiles here
        start = time.perf_counter()
        for _ in range(TIMED_BATCHES):
            model(x)
    return (time.perf_counter() - start) / (TIMED_BATCHES * len(x))


def frozen(
    model: torch.nn.Module,
    mode: CompileMode,
    *,
    example: torch.Tensor,
    views: int,
    autocast: torch.dtype | None = None,
    quiet: bool = False,
    compiler: Callable[[torch.nn.Module, int], Callable] = _freeze,
) -> Callable:
    """A frozen model compiled as `mode` says for a job of `views` inputs like `example` (one batch: its rows
    are the batch the compiled model is fed) run under `autocast`. `auto` measures (see the module's doc); where
    it weighed compiling against eager it says what it chose in one information line unless `quiet` (a job
    too short to try compiling runs eager without a word). `compiler`: how a model is compiled (a test's
    stand-in)."""
    if mode != "auto":
        return compile_frozen(model, choose_compile(mode, views=views, gflop_per_view=0.0), rows=len(example))
    eager = _seconds_per_row(model, example, autocast)
    if eager * views < MIN_COMPILE_SECONDS:
        return model
    start = time.perf_counter()
    candidate = compiler(model, len(example))
    compiled = _seconds_per_row(candidate, example, autocast)
    took = time.perf_counter() - start - compiled * (TIMED_BATCHES + 1) * len(example)
    faster = compiled < eager and ran_compiled(candidate) != "off"
    if not quiet:
        inform(
            f"--compile auto: {'compiled' if faster else 'eager'}: {views:,} views; compiled ran at "
            f"{eager / compiled:.2f}x eager's speed, measured (compiling took {took:.0f} s)"
        )
    return candidate if faster else model


def compile_training(model: torch.nn.Module, choice: CompileChoice) -> Callable:
    """A model being trained, compiled as the choice says (no freezing: its weights change)."""
    return Guarded(model, torch.compile(model)) if choice.compiled else model
