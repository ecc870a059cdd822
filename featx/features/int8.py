"""`--precision int8`: a frozen backbone quantized after training, for CPUs.

PT2E post-training quantization through torchao (the PyTorch project's quantization library): the model is
exported, observed on a seeded sample of training images (the calibration), converted to int8 with
X86InductorQuantizer's default config and compiled by Inductor with freezing, which fuses the quantized
convolutions into oneDNN's int8 kernels. The calibration images are stored in the feature file, so `predict
--images` rebuilds the same quantized model from them and gives a new image the features extraction gave it.

On CPUs without VNNI (AVX2 only) oneDNN's int8 multiply-add saturates 16-bit sums, so activations are then
quantized to 7 bits (the quantizer's `reduce_range`), and the first convolution, which would see the image
itself in 7 bits, stays fp32. Mean cosine to fp32 features of the shared MobileNetV2 on 40 real images (24
calibration images): 8 bits 0.78 (saturated), 7 bits 0.947, 7 bits with the first convolution in fp32 0.965.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import warnings
from collections.abc import Callable

import numpy as np
import torch

from featx.core.compiled import Guarded, torch_quiet
from featx.core.device import cpu_has_vnni
from featx.core.errors import FeatxError, FeatxWarning

CALIBRATION_SEED = 0  # the calibration sample is fixed by the data: the same images on every run
CHECK_IMAGES = 16  # images after the calibration sample whose int8 and fp32 features are compared
CALIBRATION_ROWS = 16
MIN_COSINE = 0.95
INSTALL = "pip install 'featx[int8]'"


class Int8Warning(FeatxWarning):
    """The quantized features strayed from the unquantized model's."""


def check_int8(device: torch.device) -> None:
    """One line saying why int8 cannot run here, or nothing."""
    if device.type != "cpu":
        raise FeatxError(f"--precision int8 runs on CPU only (this job runs on {device}); use --device cpu or bf16")
    if importlib.util.find_spec("torchao") is None:  # not imported here: its import logs through torch's logger
        raise FeatxError(f"--precision int8 needs torchao: {INSTALL}")
    from torch._inductor.cpp_builder import get_cpp_compiler

    with contextlib.suppress(Exception):
        if shutil.which(get_cpp_compiler()):
            return
    raise FeatxError(
        "--precision int8 compiles the quantized model with a C++ compiler and none was found: install g++ "
        "(e.g. apt install g++) or set CXX, or use --precision fp32"
    )


def calibration_rows(train_images: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded sample of the training split: the rows of `n` calibration images (all, where there are
    fewer), and of CHECK_IMAGES others to check the quantized model on (calibration images where none are left)."""
    if train_images < 1:
        raise FeatxError("--precision int8 calibrates on training images: the data has no train split")
    rows = np.random.default_rng(CALIBRATION_SEED).permutation(train_images)
    return rows[:n], (rows[n : n + CHECK_IMAGES] if train_images > n else rows[:CHECK_IMAGES])


def quantize(model: torch.nn.Module, calibration: torch.Tensor, *, rows: int) -> Callable:
    """The eval-mode fp32 `model` quantized to int8, observed on `calibration` (model inputs, in batches of
    CALIBRATION_ROWS whatever `rows` is) and compiled with freezing for `rows`-row batches. Deterministic: the
    same inputs give the same model."""
    import torch._inductor.config as inductor

    with torch_quiet():  # torchao's import logs through torch's logger
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    narrow = not cpu_has_vnni()
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config(reduce_range=narrow)
    )
    first = next((n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)), None)
    if narrow and first:
        quantizer.set_module_name_qconfig(first, None)
    with torch_quiet(), torch.no_grad():
        calibration = calibration.contiguous(memory_format=torch.channels_last)
        graph = torch.export.export(
            model, (calibration[:CALIBRATION_ROWS],), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
        )
        observed = prepare_pt2e(graph.module(), quantizer)
        for batch in calibration.split(CALIBRATION_ROWS):
            observed(batch)
        converted = convert_pt2e(observed)
        compiled = Guarded(converted, torch.compile(converted, dynamic=False), rows)
        # Inductor's freezing is what lowers the int8 pattern to oneDNN; the X86 quantizer's passes read the
        # global setting, not torch.compile's options, so it is set while this model compiles (now) only
        with inductor.patch(freezing=True):
            compiled(calibration[:1])
    return _NoGrad(compiled)


class _NoGrad:
    """The quantized model called under no_grad (not inference_mode: its frozen constants are plain tensors)."""

    def __init__(self, model: Callable):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch_quiet(), torch.inference_mode(False), torch.no_grad():
            return self.model(x.clone())


def mean_cosine(reference: Callable, quantized: Callable, x: torch.Tensor) -> float:
    """Mean cosine between the two models' outputs on x; warns under MIN_COSINE."""
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(reference(x).float(), quantized(x).float(), dim=-1)
    value = float(cos.mean())
    if value < MIN_COSINE:
        warnings.warn(
            f"--precision int8: the quantized features' mean cosine to fp32's is {value:.3f} (under "
            f"{MIN_COSINE}); a probe on them may score lower: use --precision fp32 or bf16, or a larger "
            "--calibration",
            Int8Warning,
            stacklevel=2,
        )
    return value
