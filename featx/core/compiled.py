"""torch.compile for every stage that runs a network over many images: `compile = "auto" | "on" | "off"`.

`on` compiles with Inductor. A frozen backbone (extract, predict) is compiled with Inductor's freezing: under
inference mode its weights become constants, folded into the graph and pre-packed for oneDNN, where most of
the gain on CPU lies. Training (finetune) compiles without freezing, since its weights change. `auto` compiles
only when the job is long enough to repay the compilation (`choose_compile`). A compilation that fails (no
C++ compiler, an operator Inductor cannot lower) warns once and the work goes on eager.

Inductor keeps what it compiled (its FX graph cache, on by default) under $TORCHINDUCTOR_CACHE_DIR, by default
`torchinductor_<user>` in the temporary directory (/tmp); a later run of the same model and shapes loads it
from there instead of compiling again. On CUDA the same code path runs; its gain there is unmeasured.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from featx.core.choices import COMPILE_MODES, CompileMode
from featx.core.errors import FeatxError, FeatxWarning

# The work (GFLOP, multiply-adds counted twice) past which compiling pays: about 40 s of compilation on 2 cores
# (MobileNetV2 and Inception-v3 alike; the graph's size, not its FLOPs, sets it) repaid by running 1.2-2x
# faster at a few hundred GFLOP/s. docs/results.md's "Compilation" section has the measurement.
BREAK_EVEN_GFLOP = 40_000.0


class CompileWarning(FeatxWarning):
    """A line about compilation for the user (the CLI renders it as one line): what `auto` chose and why, or
    that compiling failed."""


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
    step); the choice of `auto` is reported as one CompileWarning line unless `quiet`."""
    cost = gflop_per_view(model, size, device) * passes if mode == "auto" else 0.0
    choice = choose_compile(mode, views=views, gflop_per_view=cost)
    if mode == "auto" and not quiet:
        warnings.warn(choice.why, CompileWarning, stacklevel=2)
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


def compile_training(model: torch.nn.Module, choice: CompileChoice) -> Callable:
    """A model being trained, compiled as the choice says (no freezing: its weights change)."""
    return Guarded(model, torch.compile(model)) if choice.compiled else model
