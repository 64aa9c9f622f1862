import math

import pytest
import torch
from transformers import get_wsd_schedule

from cprec.errors import CPRecError
from cprec.schedule import ScheduleConfig, branch, lr, phase


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_equals_transformers_wsd_where_both_define_the_shape(shape):
    cfg = ScheduleConfig(peak_lr=2e-3, min_lr=2e-4, warmup_steps=7, stable_steps=20, anneal_steps=13,
                         anneal_shape=shape)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.peak_lr)
    sched = get_wsd_schedule(opt, num_warmup_steps=7, num_stable_steps=20, num_decay_steps=13,
                             decay_type=shape, min_lr_ratio=0.1)
    for step in range(45):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr(step, cfg), rel=1e-12, abs=1e-15), step
        opt.step()
        sched.step()


def test_exponential_and_warmup_start_formulas():
    cfg = ScheduleConfig(peak_lr=1.0, min_lr=0.1, warmup_steps=4, stable_steps=3, anneal_steps=8,
                         anneal_shape="exponential", warmup_start_lr=0.0, half_life=0.25)
    assert [lr(s, cfg) for s in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert lr(4, cfg) == lr(6, cfg) == 1.0 and phase(6, cfg) == "stable" and phase(7, cfg) == "anneal"
    end = 0.5 ** 4
    for t in range(8):
        want = 0.1 + 0.9 * (0.5 ** (t / 8 / 0.25) - end) / (1 - end)
        assert lr(7 + t, cfg) == pytest.approx(want)
    assert lr(15, cfg) == 0.1 and lr(1000, cfg) == 0.1
    values = [lr(7 + t, cfg) for t in range(9)]
    assert values == sorted(values, reverse=True)  # monotone down to min_lr


def test_branch_anneals_from_the_stable_step():
    cfg = ScheduleConfig(peak_lr=1e-3, min_lr=1e-5, warmup_steps=5, stable_steps=100, anneal_steps=10,
                         anneal_shape="cosine")
    b = branch(cfg, 40, 6)
    assert [lr(s, b) for s in range(41)] == [lr(s, cfg) for s in range(41)]
    assert phase(40, b) == "anneal" and lr(40, b) == cfg.peak_lr and lr(46, b) == cfg.min_lr
    assert lr(43, b) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(CPRecError, match="warmup phase"):
        branch(cfg, 3, 6)
