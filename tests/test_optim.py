import math

import pytest
import torch

from flowerdist.config import OptimConfig
from flowerdist.optim import build_optimizer, build_scheduler, lr_factor, scaled_lr


@pytest.mark.parametrize("rule, expected", [("linear", 0.4), ("sqrt", 0.2), ("none", 0.1)])
def test_lr_follows_the_global_batch(rule, expected):
    cfg = OptimConfig(lr=0.1, lr_scale=rule, reference_batch=64)
    assert scaled_lr(cfg, 256) == pytest.approx(expected)


def test_warmup_then_cosine_in_optimizer_steps():
    cfg = OptimConfig(warmup_steps=4, min_lr_ratio=0.1)
    total = 14
    factors = [lr_factor(s, total, 4, cfg) for s in range(total + 1)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warm-up, never 0
    assert factors[4] == pytest.approx(1.0)  # peak right after warm-up
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[14] == pytest.approx(0.1)  # the floor at the last step
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # monotone decay


def test_scheduler_steps_once_per_optimizer_step():
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="constant")
    opt = build_optimizer(model, cfg, 1.0)
    sched = build_scheduler(opt, cfg, total_steps=10, warmup=2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=0.1), 0.1)
    by_decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert [p.ndim for p in by_decay[0.1]] == [4] and len(by_decay[0.0]) == 3
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
