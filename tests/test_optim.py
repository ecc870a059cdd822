"""The one optimizer factory and the LambdaLR schedules both training loops use."""

import math

import pytest
import torch

from featx.nets.optim import OPTIMIZERS, lr_factor, make_optimizer, make_scheduler


def test_schedules_follow_their_formulas():
    exp = lr_factor("exponential", steps_per_epoch=10, epochs=5, decay=0.5)
    assert [exp(s) for s in (0, 5, 10, 20)] == pytest.approx([1, 0.5**0.5, 0.5, 0.25])
    cos = lr_factor("cosine", steps_per_epoch=10, epochs=2)
    assert [cos(s) for s in (0, 10, 20, 30)] == pytest.approx([1, 0.5, 0, 0], abs=1e-12)
    step = lr_factor("step", steps_per_epoch=4, epochs=9, decay=0.1, step_epochs=3)
    assert [step(s) for s in (0, 11, 12, 24)] == pytest.approx([1, 1, 0.1, 0.01])
    warm = lr_factor("cosine", steps_per_epoch=10, epochs=2, warmup_steps=10)
    assert warm(0) == pytest.approx(0.01) and warm(5) == pytest.approx(0.505) and warm(10) == 1
    assert warm(15) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_lambdalr_applies_the_factor_per_step_to_every_group():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer("adam", [{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.1}])
    sched = make_scheduler(opt, "exponential", steps_per_epoch=2, epochs=3, decay=0.25)
    seen = []
    for _ in range(4):
        seen += [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    assert seen == pytest.approx([1, 0.1, 0.5, 0.05, 0.25, 0.025, 0.125, 0.0125])


def test_sgd_is_nesterov_and_unknown_kinds_are_refused():
    p = torch.nn.Parameter(torch.zeros(1))
    assert make_optimizer("sgd", [{"params": [p]}]).defaults["nesterov"] is True
    assert set(OPTIMIZERS) == {"adam", "adamw", "sgd"}
    with pytest.raises(ValueError):
        make_optimizer("lamb", [{"params": [p]}])
    with pytest.raises(ValueError):
        lr_factor("linear", steps_per_epoch=1, epochs=1)
