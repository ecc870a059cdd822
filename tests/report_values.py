"""Every value a report states that its recipe must carry, one row each, with where the report says it.

tests/test_recipes.py resolves each recipe (pipelines/<recipe>.toml) as `featx run --dry-run` does and checks
every row against the resolved options of the row's stage. Reports are the plain-text files in
../shared/reports/; `section` names the report's heading and quotes the sentence.

check: "eq" the option's value; "has" the comma list (--aug) holds the value; "items" the comma list holds
exactly these items, in any order; "set" the option is given (a value the report leaves open); "min" at least.
pending: the featx option or recipe the row needs and featx lacks; the row is an expected (strict) failure
until it exists, so adding the option makes the test say to drop the mark.
"""

from __future__ import annotations

from typing import NamedTuple

MA = "000_f8a38b2bba7d0f35.txt"
INAN = "001_b60d2f16989c40cf.txt"
SUN = "002_d10c6a4bcd566876.txt"
BASTIDAS = "003_71edc84977f1dd14.txt"
MILANI = "004_367cbcd3953dba97.txt"


class Row(NamedTuple):
    recipe: str
    stage: str
    option: str
    value: object
    report: str
    section: str
    check: str = "eq"
    pending: str | None = None


ROWS: list[Row] = []


def rows(recipes: list[str], stage: str, option: str, value, report: str, section: str, **kw) -> None:
    ROWS.extend(Row(r, stage, option, value, report, section, **kw) for r in recipes)


# --- Ma (000) ----------------------------------------------------------------------------------------------
MA_ALL = [
    "ma_resnet18",
    "ma_resnet18_scratch_gaussian",
    "ma_resnet18_scratch_xavier",
    "ma_resnet18_scratch_elu",
    "ma_resnet18_overfit_pretrained",
    "ma_resnet18_overfit_scratch",
]
rows(
    MA_ALL,
    "finetune",
    "backbone",
    "resnet18",
    MA,
    'Residual network: "We use ResNet-18 with the following configuration"',
)
rows(
    ["ma_resnet18"],
    "finetune",
    "weights",
    "default",
    MA,
    'Conclusions: "We use pre-trained model to achieve 53.9% error rate on the test dataset"',
)
rows(
    ["ma_resnet18"],
    "finetune",
    "per_class",
    25,
    MA,
    'Train the residual network: "We train the ResNet-18 with 5000 images from the training set" (5,000 / 200 classes)',
)
rows(
    ["ma_resnet18_scratch_gaussian", "ma_resnet18_scratch_xavier", "ma_resnet18_scratch_elu"],
    "finetune",
    "weights",
    "none",
    MA,
    'Weight initialization: "We train the ResNet with different weight initialization" '
    "(an init only matters from scratch)",
)
rows(
    ["ma_resnet18_scratch_gaussian"],
    "finetune",
    "init",
    "gaussian:0.316",
    MA,
    'Weight initialization: "Gaussian initialization mean=0, variance=0.1" (--init gaussian:STD, std = sqrt(0.1))',
)
rows(["ma_resnet18_scratch_xavier"], "finetune", "init", "xavier", MA, 'Weight initialization: "Xavier initialization"')
for recipe, weights in (("ma_resnet18_overfit_pretrained", "default"), ("ma_resnet18_overfit_scratch", "none")):
    rows(
        [recipe],
        "finetune",
        "overfit",
        100,
        MA,
        'Overfit a small dataset: "we use ResNet-18 to overfit a small dataset of 100 images"',
    )
    rows(
        [recipe],
        "finetune",
        "weights",
        weights,
        MA,
        'Overfit a small dataset: "Overfit from pre-trained model." / "Overfit from scratch."',
    )
rows(
    ["ma_resnet18_scratch_elu"],
    "finetune",
    "activation",
    "elu",
    MA,
    'Conclusions: "The study of weight initialization and activation function is in progress" (reference: ELUs)',
)

# --- Inan (001) --------------------------------------------------------------------------------------------
INAN_BASE = [("inan_resnet_baseline", "finetune"), ("inan_ensemble", "baseline")]
INAN_LSTM = [("inan_resnet_lstm", "finetune"), ("inan_ensemble", "lstm")]
INAN_GROUP128, INAN_EARLY = ("inan_resnet_lstm_group128", "finetune"), ("inan_resnet_lstm_early", "finetune")
for recipe, stage in INAN_BASE + INAN_LSTM + [INAN_GROUP128, INAN_EARLY]:
    rows([recipe], stage, "backbone", "resnet18", INAN, '4. Experiment, Figure 1: "18-layer residual"')
    rows(
        [recipe],
        stage,
        "weights",
        "default",
        INAN,
        '1. Introduction: "it proves to be better to utilize the pretrained models"',
    )
for recipe, stage in INAN_BASE:
    rows(
        [recipe],
        stage,
        "head",
        "linear",
        INAN,
        '3. Approach: "modifying the last layer, i.e., the fully-connected layer such that it provides scores '
        'for 200 classes"',
    )
for recipe, stage in INAN_LSTM + [INAN_GROUP128, INAN_EARLY]:
    rows([recipe], stage, "head", "lstm", INAN, '3. Approach: "there will be in total of 12 LSTM\'s"')
    rows(
        [recipe],
        stage,
        "size",
        224,
        INAN,
        '3. Approach: conv4 "hidden size 14 * 14 = 196", conv5 "7 * 7 = 49" (the maps of a 224 input)',
    )
    rows(
        [recipe],
        stage,
        "freeze_epochs",
        1,
        INAN,
        '4. Experiment: "We first kept all the convolutional layers constant while ... '
        "the LSTM's and the final fully-connected layer\"",
        check="min",
    )
    rows(
        [recipe],
        stage,
        "unfreeze_on_plateau",
        None,
        INAN,
        '4. Experiment: "when we reached at a flat region in terms of accuracy, we trained the whole network"',
        check="set",
    )
    rows(
        [recipe],
        stage,
        "max_head_epochs",
        None,
        INAN,
        '4. Experiment: "a jump in the performance when we went to training the whole network" (the body must '
        "train: the head-only phase is bounded)",
        check="set",
    )
    rows(
        [recipe],
        stage,
        "restart_schedule",
        True,
        INAN,
        '4. Experiment: "when we reached at a flat region in terms of accuracy, we trained the whole network" '
        "(a second stage: a schedule of its own)",
    )
for recipe, stage in INAN_LSTM + [INAN_EARLY]:
    rows([recipe], stage, "lstm_group", 64, INAN, '3. Approach: "we separate them into groups of length 64"')
rows(
    ["inan_resnet_lstm_group128"],
    "finetune",
    "lstm_group",
    128,
    INAN,
    '4. Experiment: "using different sequence lengths, for instance, 128 instead of 64"',
)
rows(
    ["inan_resnet_lstm_early"],
    "finetune",
    "lstm_stages",
    ["layer2", "layer3"],
    INAN,
    '4. Experiment: "We also tried adding LSTM\'s to the earlier layers"',
)
rows(
    ["inan_ensemble"],
    "predict",
    "runs",
    ["runs/inan_resnet_baseline/finetune", "runs/inan_resnet_lstm/finetune"],
    INAN,
    '4. Experiment: "we took the average of the scores produced by these networks"',
)
for stage in ("predict", "submission"):
    rows(
        ["inan_ensemble"],
        stage,
        "combine",
        "logits",
        INAN,
        '4. Experiment: "we took the average of the scores produced by these networks" (scores: the fc\'s outputs)',
    )

# --- Sun (002) ---------------------------------------------------------------------------------------------
rows(
    ["sun_resnet_stochastic_depth"],
    "finetune",
    "drop_path",
    None,
    SUN,
    'Improved Model #2: "Stochastic Depth ... Entire layers get dropped randomly"',
    check="set",
)
rows(["sun_resnet"], "finetune", "drop_path", None, SUN, "Resnet and Model #1 (the plain ResNet that overfits)")
rows(
    ["sun_resnet_augmented"],
    "finetune",
    "aug",
    "invert,brightness,noise,flip,rotate,scale,shift,shear",
    SUN,
    "More is coming (Model #3): its list Invert, Brightness, Noise, Flip, Rotate, Scale, Shift, Shear",
    check="items",
)
rows(
    ["sun_resnet_augmented"],
    "finetune",
    "aug",
    "brightness",
    SUN,
    'More is coming (Model #3): "Brightness" (brightness alone: the list names no contrast)',
    check="has",
)

# --- Bastidas (003) ----------------------------------------------------------------------------------------
BASTIDAS_ALL = ["bastidas_vgg_like", "bastidas_inception_like"]
rows(
    ["bastidas_vgg_like"],
    "finetune",
    "backbone",
    "bastidas_vgg",
    BASTIDAS,
    "Model Architectures: the VGG-Like layer list",
)
rows(
    ["bastidas_inception_like"],
    "finetune",
    "backbone",
    "bastidas_inception",
    BASTIDAS,
    "Model Architectures: the InceptionV3-Like layer list",
)
rows(
    BASTIDAS_ALL,
    "finetune",
    "weights",
    "none",
    BASTIDAS,
    'Model Architectures: "This model was inspired by VGGNet" / "Inceptionv3" (own nets, trained by the author)',
)
rows(BASTIDAS_ALL, "finetune", "size", 64, BASTIDAS, 'Data: "composed of 3x64x64 pixel images across 200 classes"')
rows(
    BASTIDAS_ALL, "finetune", "optimizer", "adam", BASTIDAS, 'Algorithms: "the stochastic optimization algorithm, Adam"'
)
rows(
    BASTIDAS_ALL,
    "finetune",
    "weight_decay",
    None,
    BASTIDAS,
    'Algorithms: "all convolutional layers also include I2 regularization" (sic)',
    check="set",
)
rows(
    BASTIDAS_ALL,
    "finetune",
    "weight_decay_on",
    "conv",
    BASTIDAS,
    'Algorithms: "all convolutional layers also include I2 regularization" (sic): the convolutions only',
)
rows(
    BASTIDAS_ALL,
    "finetune",
    "schedule",
    "step",
    BASTIDAS,
    'Metrics & Results: "learning rate was adjusted manually throughout training" (featx\'s reading: drops in '
    "steps, the nearest to drops made by hand)",
)
rows(
    BASTIDAS_ALL,
    "finetune",
    "label_smoothing",
    0.0,
    BASTIDAS,
    'Algorithms: "the standard loss function used is the Softmax or cross-entropy loss"',
)
rows(
    BASTIDAS_ALL,
    "finetune",
    "dropout",
    0.0,
    BASTIDAS,
    'Metrics & Results: "Adding Batch Normalization instead of DropOut ... helped produce better results"',
)
rows(
    BASTIDAS_ALL,
    "finetune",
    "aug",
    "rotate,flip,shift",
    BASTIDAS,
    'Data: "augmented randomly by rotating up to 45 '
    'degrees, flipping horizontally, and shifting height and width ranges"',
    check="items",
)
rows(BASTIDAS_ALL, "finetune", "aug", "rotate:45", BASTIDAS, 'Data: "rotating up to 45 degrees"', check="has")
rows(
    BASTIDAS_ALL,
    "finetune",
    "normalize",
    "mean-image",
    BASTIDAS,
    'Data: "The training data was preprocessed by subtracting the mean image"',
)

# --- Milani, section 3: from scratch (004) -----------------------------------------------------------------
MILANI_ALL = ["milani_scratch_inception", "milani_scratch_inception_regularized"]
MILANI_BASE, MILANI_REG = MILANI_ALL
rows(
    MILANI_ALL,
    "finetune",
    "backbone",
    "milani_inception",
    MILANI,
    '3.1: "My own architecture ... is shown on Fig. 3(b)"',
)
rows(MILANI_ALL, "finetune", "weights", "none", MILANI, "3. Training a Model from Scratch")
rows(MILANI_ALL, "finetune", "size", 64, MILANI, '3.1: "the input image to my architecture is 64 x 64"')
rows(MILANI_ALL, "finetune", "label_smoothing", 0.1, MILANI, '3.1: "I picked epsilon = 0.1"')
rows(
    MILANI_ALL,
    "finetune",
    "optimizer",
    "adam",
    MILANI,
    '3.2: "I used the Adam scheme with default TensorFlow parameters"',
)
rows(
    MILANI_ALL,
    "finetune",
    "weight_decay",
    0.08,
    MILANI,
    '3.2: "I tried a few different weight decays and settled on 0.08"; 3.3: "training parameters ... kept identical"',
)
rows(
    MILANI_ALL,
    "finetune",
    "schedule",
    "exponential",
    MILANI,
    '3.2: "decayed by 0.9 at every epoch"; 3.3: "once every *two* epochs" (featx\'s reading, one for all of the '
    "report's per-epoch decays: applied smoothly within the epoch, as the transfer recipes' 0.713)",
)
rows([MILANI_BASE], "finetune", "decay", 0.9, MILANI, '3.2: "decayed by 0.9 at every epoch"')
rows(
    [MILANI_REG],
    "finetune",
    "decay",
    0.9**0.5,
    MILANI,
    '3.3: "it decayed by a factor of 0.9 once every *two* epochs" (per epoch, smoothly: 0.9^(1/2))',
)
rows([MILANI_BASE], "finetune", "lr", 1e-3, MILANI, '3.2: "settled on 1 x 10^{-3}"')
rows([MILANI_BASE], "finetune", "dropout", 0.0, MILANI, '3.2: "I also decided not to use the dropout layer"')
rows(
    [MILANI_BASE],
    "finetune",
    "aug",
    [],
    MILANI,
    '3.3: the second attempt "added data augmentation at training time" (the baseline had none)',
)
rows(
    [MILANI_BASE],
    "finetune",
    "epochs",
    30,
    MILANI,
    '3.3: "at 30 epochs, the training ... was already above 80%"',
    check="min",
)
rows([MILANI_REG], "finetune", "lr", 2e-3, MILANI, '3.3: "the initial learning rate was doubled"')
rows(
    [MILANI_REG],
    "finetune",
    "dropout",
    0.2,
    MILANI,
    '3.3: "I added a dropout layer before the fully connected layer ... with keep probability of 80%"',
)
rows(
    [MILANI_REG],
    "finetune",
    "aug",
    "flip,color",
    MILANI,
    '3.3: "each image was randomly flipped left-right ... and its brightness and contrast were randomly adjusted"',
    check="items",
)
rows(MILANI_ALL, "finetune", "keep", 20, MILANI, '3.4: "A maximum number of 20 models can be saved at once"')
rows(
    MILANI_ALL,
    "finetune",
    "snapshot_every",
    None,
    MILANI,
    '3.4: "If the new validation accuracy, calculated after '
    'some number of training steps, surpassed the best seen so far, then the new weights would be saved"',
    check="set",
)
rows(
    MILANI_ALL,
    "finetune",
    "keep_rule",
    "records",
    MILANI,
    '3.4: "If the new validation accuracy, calculated after some number of training steps, surpassed the best seen '
    'so far, then the new weights would be saved" ... "the first saved file would be overwritten"',
)
for stage in ("predict", "submission", "report"):
    rows(
        [MILANI_BASE],
        stage,
        "ensemble",
        "best-size",
        MILANI,
        '3.4: "I investigated how many networks should be added to the ensemble to maximize the top-1 validation '
        'accuracy" ... "the highest accuracy was obtained from an ensemble of the best 9 networks" (9: the argmax of '
        "the report's curve; the size is chosen on val, then applied to test)",
    )
    rows(
        [MILANI_REG],
        stage,
        "ensemble",
        "best-size",
        MILANI,
        '3.4: "46.8% (best ensemble)": the size that scores best on val',
    )
rows(
    MILANI_ALL,
    "predict",
    "eval_views",
    "full",
    MILANI,
    "3.4, Eq. 2: one score per network and example (test-time crops only come in section 4)",
)

rows(
    [MILANI_BASE, MILANI_REG],
    "predict",
    "combine",
    "raw",
    MILANI,
    '3.4: "taking the softmax function of the '
    "scores, summing them for all the N networks of the ensemble, and predicting the class with the maximum "
    'probability"',
)
rows(MILANI_ALL, "submission", "combine", "raw", MILANI, '3.4: "summing them for all the N networks of the ensemble"')
rows(MILANI_ALL, "report", "combine", "raw", MILANI, '3.4: "summing them for all the N networks of the ensemble"')

# --- one score per image, the whole image: none of these reports names a test-time view (no mirror average, no
# centre crop), so their recipes' scoring stages score one view, and crop-trained runs choose on the whole image --
SCORING = ["predict", "report"]
SUBMITTING = ["predict", "submission", "report"]
SCORED: dict[str, tuple[str, dict[str, list[str]]]] = {
    MA: (
        'Conclusions: "We use pre-trained model to achieve 53.9% error rate on the test dataset"',
        {"ma_resnet18": SUBMITTING, **{r: SCORING for r in MA_ALL[1:4]}, "ma_resnet18_filters": ["report"]},
    ),
    INAN: (
        '4. Experiment: "The final accuracy for the validation set is 0.6659"',
        {
            "inan_resnet_baseline": SUBMITTING,
            "inan_resnet_lstm": SUBMITTING,
            "inan_resnet_lstm_early": SCORING,
            "inan_resnet_lstm_group128": SCORING,
            "inan_ensemble": ["predict", "submission"],
        },
    ),
    SUN: (
        'Resnet and Model #1: "Val Err = 50% (Test Err 48%)"',
        {"sun_resnet": SUBMITTING, "sun_resnet_stochastic_depth": SUBMITTING, "sun_resnet_augmented": SCORING},
    ),
    BASTIDAS: ("Classification Metrics: the val accuracy", {r: SCORING for r in BASTIDAS_ALL}),
}
CROP_TRAINED = {
    **{r: ["finetune"] for r in MA_ALL[:4]},
    "ma_resnet18_filters": ["pretrained", "scratch"],
    **{r: ["finetune"] for r, _ in INAN_BASE[:1] + INAN_LSTM[:1] + [INAN_GROUP128, INAN_EARLY]},
    "inan_ensemble": ["baseline", "lstm"],
}
for report, (section, scored) in SCORED.items():
    for recipe, stages in scored.items():
        for stage in stages:
            rows([recipe], stage, "eval_views", "full", report, section + " (one view: the whole image)")
for recipe, stages in CROP_TRAINED.items():
    for stage in stages:
        report = MA if recipe.startswith("ma_") else INAN
        rows([recipe], stage, "score_crop", False, report, "crop-trained, scored on the whole image as the report")

# --- Ma's filter figure ---------------------------------------------------------------------------------------
rows(
    ["ma_resnet18_filters"],
    "pretrained",
    "weights",
    "default",
    MA,
    'Residual network: "Convolution filters from the first layer. We run 30 iterations from the pre-trained model."',
)
rows(["ma_resnet18_filters"], "pretrained", "backbone", "resnet18", MA, 'Residual network: "We use ResNet-18"')
rows(["ma_resnet18_filters"], "scratch", "backbone", "resnet18", MA, 'Residual network: "We use ResNet-18"')
rows(
    ["ma_resnet18_filters"],
    "report",
    "runs",
    ["runs/ma_resnet18_filters/pretrained", "runs/ma_resnet18_filters/scratch"],
    MA,
    'Residual network: "Convolution filters from the first layer" (both runs\' in one figure)',
)

# --- test submissions: every recipe whose report gives a test number writes the file the report sent ----------
SUBMITTED = {
    MA: (["ma_resnet18"], 'Abstract: "We use ResNet-18 to achieve 53.9% error rate on the test dataset"'),
    INAN: (
        ["inan_resnet_baseline", "inan_resnet_lstm", "inan_ensemble"],
        '4. Experiment: "the final predictions are '
        'obtained using test images and sent to the online server for the performance on the test set"',
    ),
    SUN: (
        ["sun_resnet", "sun_resnet_stochastic_depth"],
        'Introduction: "ranking the 3rd on the evaluation server"; '
        'Result #1 "Test Err 48%", Improved Results #2 "Test Err 43%"',
    ),
    MILANI: (
        MILANI_ALL,
        '3.4: "only the ensembles were submitted to the evaluation server to determine the test error"',
    ),
}
for report, (recipes, section) in SUBMITTED.items():
    rows(recipes, "submission", "split", "test", report, section)

# The recipe's readings of figures and lines the conversion garbled or lost: its opening comment says "featx's
# reading" and quotes these words of the report.
READINGS: dict[str, tuple[str, list[str]]] = {
    MILANI_BASE: (
        MILANI,
        [
            "It contains the same inception layers as Inception-v3, but it is shallower and narrower: "
            "the number of layers and number of filters was reduced when compared to Fig. 3(a)"
        ],
    ),
    MILANI_REG: (
        MILANI,
        [
            "It contains the same inception layers as Inception-v3, but it is shallower and narrower: "
            "the number of layers and number of filters was reduced when compared to Fig. 3(a)"
        ],
    ),
    "bastidas_vgg_like": (BASTIDAS, ["2 2x1, stride 1,1", "2,3x3, stride 1,1", "Flatten", "SoftMax-200"]),
    "bastidas_inception_like": (
        BASTIDAS,
        [
            "Google's Inceptionv3 framework",
            "once again, all filters were",
            "inception modules used was reduced as well",
            "Global Average Pool",
        ],
    ),
}

# The numbers each recipe's opening comment quotes (checked verbatim), with their source.
NUMBERS: dict[str, tuple[str, list[str]]] = {
    "ma_resnet18": (MA, ["53.9% error rate on the test dataset"]),
    "inan_resnet_baseline": (INAN, ["test error of 0.338"]),
    "inan_resnet_lstm": (INAN, ["0.6659", "error rate of 0.386"]),
    "inan_ensemble": (INAN, ["error rate of 0.329"]),
    "sun_resnet": (SUN, ["Val Err = 50%", "Test Err 48%"]),
    "sun_resnet_stochastic_depth": (SUN, ["Val Err = ~40%", "Test Err 43%"]),
    "bastidas_vgg_like": (BASTIDAS, ["0.3453", "0.3679"]),
    "bastidas_inception_like": (BASTIDAS, ["0.4071", "0.4073"]),
    "milani_scratch_inception": (MILANI, ["51.5%", "47.8%", "52.3%", "48.5%", "52.2%"]),
    "milani_scratch_inception_regularized": (MILANI, ["53.9%", "53.2%", "57.2%", "46.1%", "46.8%"]),
}

# The recipes whose report states no number, with the report's words saying so.
SILENT: dict[str, tuple[str, str]] = {
    "ma_resnet18_scratch_gaussian": (MA, "The study of weight initialization and activation function is in progress"),
    "ma_resnet18_scratch_xavier": (MA, "The study of weight initialization and activation function is in progress"),
    "ma_resnet18_scratch_elu": (MA, "The study of weight initialization and activation function is in progress"),
    "ma_resnet18_overfit_pretrained": (MA, "The pre-trained model start from low accuracy but converge fast."),
    "ma_resnet18_overfit_scratch": (MA, "We fail to overfit when starting from scratch."),
    "inan_resnet_lstm_group128": (INAN, "but they gave similar performances"),
    "inan_resnet_lstm_early": (INAN, "but they gave similar performances"),
    "sun_resnet_augmented": (SUN, "Model #3 is still under training"),
    "ma_resnet18_filters": (MA, "We run 30 iterations from the pre-trained model."),
}
