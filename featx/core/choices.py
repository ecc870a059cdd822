"""Every enumerated option, stated once: a `Literal` type for the API's signatures and, derived from it, the
tuple of its values for the CLI's `click.Choice` and the API's own checks.

The bottom layer: it imports nothing from featx, so every module may import it.
"""

from collections.abc import Sequence
from typing import Literal, get_args

Device = Literal["auto", "cpu", "cuda"]  # resolve_device also takes "cuda:N"
DEVICES = get_args(Device)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = get_args(Precision)
# a frozen backbone (extract, compare, predict) may also run quantized to int8 (CPU; featx.features.int8)
FrozenPrecision = Literal[Precision, "int8"]
FROZEN_PRECISIONS = get_args(FrozenPrecision)
# the probe's heads train without a loss scaler, which fp16's narrow range would need
ProbePrecision = Literal["auto", "fp32", "bf16"]
PROBE_PRECISIONS = get_args(ProbePrecision)
CompileMode = Literal["auto", "on", "off"]  # torch.compile: auto compiles where the job is long enough to pay
COMPILE_MODES = get_args(CompileMode)
FeatureDtype = Literal["float16", "float32"]
FEATURE_DTYPES = get_args(FeatureDtype)
Split = Literal["train", "val", "test"]
SPLITS = get_args(Split)
ViewSet = Literal["full", "flip", "ten"]  # extract: the views to compute (featx.nets.views.VIEW_SETS)
VIEW_SET_NAMES = get_args(ViewSet)
EvalViews = Literal["all", "full"]  # probe, predict, report: the stored views to use (all, or the full image)
EVAL_VIEWS = get_args(EvalViews)
# probe and the feature readers also take stored view names, as a comma list ("full,top_left,aug0") or a list
ViewSelection = EvalViews | str | Sequence[str]
Optimizer = Literal["adam", "adamw", "sgd"]
OPTIMIZERS = get_args(Optimizer)
TrainedHead = Literal["linear", "mlp"]  # probe heads fitted by gradient descent (featx.nets.heads)
TRAINED_HEADS = get_args(TrainedHead)
ProbeHead = Literal[TrainedHead, "knn", "ncm"]  # knn, ncm: featx.probe.neighbors, no training
PROBE_HEADS = get_args(ProbeHead)
ProbeSchedule = Literal["exponential", "cosine"]
PROBE_SCHEDULES = get_args(ProbeSchedule)
FinetuneHead = Literal["linear", "lstm"]
FINETUNE_HEADS = get_args(FinetuneHead)
FinetuneSchedule = Literal["cosine", "exponential", "step"]
FINETUNE_SCHEDULES = get_args(FinetuneSchedule)
BatchNormMode = Literal["auto", "frozen", "train", "sync"]  # finetune: auto picks frozen for folded weights
BN_MODES = get_args(BatchNormMode)
Activation = Literal["relu", "elu"]  # finetune's ResNets: every ReLU of the body
ACTIVATION_NAMES = get_args(Activation)
ImageNormalize = Literal["channel", "mean-image"]  # finetune: per-channel mean/std, or also the mean training image
IMAGE_NORMALIZE = get_args(ImageNormalize)
Normalize = Literal["none", "l2", "standard"]
NORMALIZE = get_args(Normalize)
# predict, report: how checkpoint probabilities are combined: each at the temperature fitted on its run's selection
# split (a probe run's calibration), or the raw softmax (Milani's snapshot ensembles, report Eq. 2). A finetune run's
# checkpoints carry no temperature, so both give its raw softmax; logits averages a finetune run's logits (over
# views, checkpoints and runs) before one softmax (Inan's "average of the scores").
Combine = Literal["calibrated", "raw", "logits"]
COMBINES = get_args(Combine)
KeepRule = Literal["best", "records"]  # finetune: the K best evaluations, or each new best with the oldest dropped
KEEP_RULES = get_args(KeepRule)
WeightDecayOn = Literal["weights", "conv"]  # finetune: every weight matrix and kernel, or convolution kernels only
WEIGHT_DECAY_ON = get_args(WeightDecayOn)
SaveMode = Literal["best", "all"]  # probe: snapshots of the best head only, or of every head
SAVE_MODES = get_args(SaveMode)

# A run's checkpoints averaged by predict and report: best, top:K (the best K), greedy, best-size (the top:K whose
# K scores best on the run's selection split) or all. No Literal can
# spell top:K, so the API types it str.
ENSEMBLES = ("best", "top:K", "greedy", "best-size", "all")
