"""What the reports' readings need, as behaviour (the recipes pin the settings in tests/test_recipes*.py): Milani's
records-only snapshots, an ensemble size chosen on the curve, a decay per probe head, views read epoch by epoch,
Bastidas' weight decay on convolutions only, Inan's logit averaging, a bounded head-only phase followed by a
schedule of the whole network's own, and full-frame scoring of a crop-trained run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_probe import write_synthetic

from featx.core import runs
from featx.core.configs import FinetuneConfig, ProbeConfig
from featx.core.errors import FeatxError
from featx.evaluate.metrics import Scored, best_size, ensemble_curve, greedy, pool
from featx.evaluate.scoring import predict
from featx.features.batches import batch_source, batches
from featx.features.store import load_features
from featx.finetune.run import _param_groups, check_config, eval_views, finetune, trains_head_alone
from featx.front.stages import probe as stage_probe
from featx.nets.models import ModelSpec, build_model
from featx.nets.optim import make_optimizer
from featx.probe.sweep import HeadConfig, head_grid, train

# --- Milani's snapshots: "surpassed the best seen so far", at most 20, the oldest overwritten -------------------


def _offer_all(tmp_path, tops: list[float], *, records: bool) -> runs.Snapshots:
    (tmp_path / runs.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    snaps = runs.Snapshots(tmp_path, keep=3, name="epoch{epoch:03d}.pt", records=records)
    for epoch, top in enumerate(tops, 1):
        snaps.offer(0, epoch, top, top, lambda: {"state": {"w": torch.zeros(2)}})
        snaps.prune()
    return snaps


def test_the_records_rule_keeps_only_new_bests_and_drops_the_oldest(tmp_path):
    tops = [0.10, 0.30, 0.20, 0.40, 0.50, 0.45, 0.60, 0.55]
    records = _offer_all(tmp_path / "records", tops, records=True)
    # new bests at epochs 1, 2, 4, 5, 7; the three newest stay, newest (= best) first
    assert [s.epoch for s in records.listing()] == [7, 5, 4]
    on_disk = {p.name for p in (tmp_path / "records" / runs.CHECKPOINTS).glob("*.pt")}
    assert on_disk == {"epoch007.pt", "epoch005.pt", "epoch004.pt"}
    # the default keeps the three best of all evaluations, 0.55 among them though it beat no earlier record
    assert [s.epoch for s in _offer_all(tmp_path / "best", tops, records=False).listing()] == [7, 8, 5]


# --- the ensemble size chosen on the curve ---------------------------------------------------------------------


def test_best_size_takes_the_curves_argmax_where_greedy_stops_early():
    labels = np.array([0, 1, 2, 0])
    # seven checkpoints, best first: the second adds nothing (greedy stops there), the third and fourth lift the
    # ensemble to 100%, the last three pull it down
    weak = [[0.6, 0.4, 0], [0, 0.6, 0.4], [0.4, 0.6, 0], [0.4, 0.6, 0]]
    right = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]
    wrong = [[0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]]
    probs = np.array([weak, weak, right, right, wrong, wrong, wrong], dtype=np.float32)
    curve = ensemble_curve([Scored(["a", "b", "c", "d"], labels, probs)])
    assert curve == [0.5, 0.5, 0.75, 1.0, 1.0, 0.5, 0.25]
    assert greedy(probs, labels) == [0]
    assert best_size(probs, labels) == [0, 1, 2, 3]  # top:4, the curve's first argmax


# --- Inan's "average of the scores": logits, not softmaxes -----------------------------------------------------


def test_logit_averaging_differs_from_softmax_averaging_on_a_fixed_example():
    logits = torch.tensor([[[4.0, 0.0, 0.0]], [[-4.0, 1.0, 0.0]]])  # two members, one example, three classes
    probs = logits.softmax(-1).numpy()
    softmax_mean, logit_mean = pool(probs, "raw"), pool(probs, "logits")
    assert softmax_mean[0].argmax() == 0  # the first member's confident class 0 outweighs in probability
    assert logit_mean[0].argmax() == 1  # the mean logits are [0, 0.5, 0]
    assert np.allclose(logit_mean, logits.mean(0).softmax(-1).numpy(), atol=1e-6)


# --- Milani 4.2: the decay cross-validated with the learning rate and weight decay ----------------------------


def test_one_decay_keeps_the_sweep_and_a_list_adds_an_axis():
    default = head_grid(ProbeConfig(features="f.h5"))
    assert len(default) == 9 and {h.lr_decay for h in default} == {0.713}
    swept = head_grid(ProbeConfig(features="f.h5", lr_decay=(0.5, 0.9)))
    assert len(swept) == 18 and sorted({h.lr_decay for h in swept}) == [0.5, 0.9]
    assert head_grid(ProbeConfig(features="f.h5", lr=(1e-3,), lr_decay=(0.713,))) == [HeadConfig(lr=1e-3)]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    path = write_synthetic(tmp_path_factory.mktemp("decay") / "blobs.h5", noise=0.8)
    return load_features(path, "train"), load_features(path, "val")


def test_a_decay_list_trains_one_head_per_decay_each_as_it_would_alone(blobs):
    tr, va = blobs
    options = {"epochs": 3, "batch_size": 20, "device": "cpu", "seed": 0}
    heads = [HeadConfig(lr=0.05, lr_decay=0.2), HeadConfig(lr=0.05, lr_decay=0.95)]
    both = train(tr, val=va, heads=heads, **options)
    alone = [train(tr, val=va, heads=[h], **options) for h in heads]
    for h in range(2):  # the heads share minibatches only: each trains as it does alone, at its own decay
        assert torch.allclose(both.heads.head_state(h)["weights.0"], alone[h].heads.head_state(0)["weights.0"])
    assert not torch.allclose(both.heads.head_state(0)["weights.0"], both.heads.head_state(1)["weights.0"])


# --- Milani v3: epoch e trains on every image's draw e ---------------------------------------------------------


def test_epoch_e_reads_view_e_of_every_image(blobs):
    tr, _ = blobs
    src = batch_source(tr, torch.device("cpu"))
    for view in range(tr.features.shape[1]):
        seen = torch.cat([x for x, _ in batches(src, torch.Generator().manual_seed(0), 16, view=view)])
        expected = tr.features[:, view].astype(np.float32).tolist()
        assert sorted(seen.float().tolist()) == sorted(expected), view  # every image once, as its view `view`
    with pytest.raises(FeatxError, match="--epoch-views: 3 training views for --epochs 4"):
        train(tr, val=tr, epochs=4, epoch_views=True, device="cpu")


# --- Bastidas: "all convolutional layers also include l2 regularization" ---------------------------------------


def test_conv_only_weight_decay_leaves_the_classifier_undecayed():
    torch.manual_seed(0)
    model = build_model(ModelSpec("bastidas_vgg", 64, 10, "linear", [0.5] * 3, [0.5] * 3, 56))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer("sgd", _param_groups(model, 0.1, "conv"), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only the weight decay moves anything
    opt.step()
    after = model.state_dict()
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert convs and linears
    assert all(torch.allclose(after[k], before[k] * (1 - 0.1 * 0.1 * 1.9)) for k in convs)  # Nesterov's 1 + 0.9
    assert all(torch.equal(after[k], before[k]) for k in linears)


# --- Inan: a bounded head-only phase, then the whole network on a schedule of its own --------------------------


def test_the_head_trains_alone_for_at_most_max_head_epochs():
    bounded = FinetuneConfig(backbone="resnet18", freeze_epochs=1, unfreeze_on_plateau=1, max_head_epochs=2)
    rising = [{"val_top1": t, "frozen": True} for t in (0.1, 0.2, 0.3)]
    assert [trains_head_alone(bounded, rising[:n]) for n in range(4)] == [True, True, False, False]
    with pytest.raises(FeatxError, match="--max-head-epochs 2: bounds --unfreeze-on-plateau"):
        check_config(FinetuneConfig(backbone="resnet18", max_head_epochs=2))


@pytest.mark.numerics
def test_the_switch_is_recorded_and_the_body_moves_after_it_on_a_restarted_schedule(synth_cache, tmp_path):
    out = tmp_path / "staged"
    config = FinetuneConfig(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=32,
        epochs=3,
        batch_size=16,
        aug=[],
        freeze_epochs=1,
        unfreeze_on_plateau=5,  # never reached in 3 epochs: max-head-epochs decides
        max_head_epochs=1,
        restart_schedule=True,
        lr=0.01,
        keep=3,
        device="cpu",
    )
    result = finetune(config, out=out, progress=False)
    assert [r["frozen"] for r in result.epochs] == [True, False, False]
    assert runs.read_run(out).resolved["unfrozen_epoch"] == 2
    assert json.loads((out / "results.json").read_text())["unfrozen_epoch"] == 2
    # the cosine restarts over epochs 2-3: half-way at the end of epoch 2 (0.25 had it gone on over all three)
    assert result.epochs[1]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi / 2)), abs=1e-9)
    states = [runs.load_checkpoint(out / runs.CHECKPOINTS / f"epoch{e:03d}.pt")["state"] for e in (1, 2, 3)]
    body = [k for k in states[0] if k.startswith("body.") and states[0][k].is_floating_point()]
    assert not all(torch.equal(states[0][k], states[2][k]) for k in body)  # the body moved after the switch
    # an ensemble size chosen on val is the one applied to test
    val = predict(runs=[out], split="val", eval_views="full", ensemble="best-size")
    test = predict(runs=[out], split="test", eval_views="full", ensemble="best-size")
    assert val.members == test.members


# --- scoring what the report scored: the whole image of a crop-trained run --------------------------------------


def test_no_score_crop_scores_the_whole_image_of_a_crop_trained_run():
    crop = FinetuneConfig(backbone="resnet18", aug=["flip", "crop"])
    assert eval_views(crop) == ["center"]
    assert eval_views(FinetuneConfig(backbone="resnet18", aug=["flip", "crop"], score_crop=False)) == ["full"]


def test_a_0_2_probe_run_with_one_decay_stays_up_to_date(tmp_path):
    path = write_synthetic(tmp_path / "f.h5")
    config = ProbeConfig(features=str(path), lr=(0.05,), epochs=2, device="cpu")
    out = tmp_path / "run"
    first = stage_probe(config, out=out)
    record = json.loads((out / "run.json").read_text())
    # run.json as 0.2 wrote it: one decay for the run, heads without theirs, no --epoch-views
    record["config"]["lr_decay"] = 0.713
    del record["config"]["epoch_views"]
    for h in record["config"]["heads"]:
        del h["lr_decay"]
    (out / "run.json").write_text(json.dumps(record))
    again = stage_probe(config, out=out)
    assert again.heads is None  # read back from the run, not trained again
    assert again.configs == first.configs == [HeadConfig(lr=0.05)]
