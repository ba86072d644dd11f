import math

import pytest
import torch

from largefr.config import ScheduleConfig
from largefr.train.schedule import LRSchedule, ScheduledLR, schedule_from_config


def test_poly_with_warmup_exact_values():
    s = LRSchedule(total_steps=10, warmup_steps=4, decay="poly", power=2.0)
    assert [s(i) for i in range(4)] == [0.2, 0.4, 0.6, 0.8]
    # after warmup: (1 - (i - 4) / 6) ** 2
    assert s(4) == 1.0
    assert s(7) == pytest.approx(0.25)
    assert s(10) == 0.0 and s(25) == 0.0


def test_poly_without_warmup_matches_arcface_torch_formula():
    s = LRSchedule(total_steps=100, power=2.0)
    for i in (0, 1, 37, 99, 100):
        assert s(i) == pytest.approx((1 - i / 100) ** 2, abs=1e-15)


def test_cosine_and_min_lr_exact_values():
    s = LRSchedule(total_steps=8, warmup_steps=0, decay="cosine")
    assert [s(i) for i in (0, 2, 4, 6, 8)] == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                             (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    m = LRSchedule(total_steps=8, decay="cosine", min_lr_ratio=0.1)
    assert m(0) == pytest.approx(1.0) and m(4) == pytest.approx(0.55) and m(8) == pytest.approx(0.1)
    assert m(100) == pytest.approx(0.1)


def test_warmup_equal_to_total_is_pure_warmup():
    s = LRSchedule(total_steps=3, warmup_steps=3)
    assert [s(i) for i in range(5)] == [0.25, 0.5, 0.75, 0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"total_steps": 0}, "total_steps must be >= 1, got 0"),
        ({"total_steps": 5, "warmup_steps": 6}, r"warmup_steps must be in \[0, total_steps=5\], got 6"),
        ({"total_steps": 5, "decay": "step"}, "decay must be 'poly' or 'cosine', got 'step'"),
        ({"total_steps": 5, "power": 0.0}, "power must be > 0, got 0.0"),
        ({"total_steps": 5, "min_lr_ratio": 2.0}, r"min_lr_ratio must be in \[0, 1\], got 2.0"),
    ],
)
def test_bad_schedule_is_a_clear_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LRSchedule(**kwargs)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        LRSchedule(total_steps=5)(-1)


def test_usable_as_lambdalr_factor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(total_steps=4, warmup_steps=1))
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1 * (2 / 3) ** 2, 0.1 * (1 / 3) ** 2, 0.0])


class RowSparseLike:
    """Stands in for the head's custom optimizer: only ``param_groups`` with "lr"."""

    def __init__(self, lr: float) -> None:
        self.param_groups = [{"lr": lr, "weight_decay": 0.0}]


def test_scheduled_lr_drives_torch_and_custom_optimizers_and_resumes():
    backbone = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    head = RowSparseLike(lr=0.4)
    schedule = LRSchedule(total_steps=4, warmup_steps=0, power=1.0)
    sched = ScheduledLR([backbone, head], schedule)
    seen = list(sched.get_last_lr())
    for _ in range(2):
        sched.step()
        seen += sched.get_last_lr()
    assert seen == pytest.approx([0.1, 0.4, 0.075, 0.3, 0.05, 0.2])
    # resume into fresh optimizers from the saved step
    backbone2, head2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), RowSparseLike(0.4)
    resumed = ScheduledLR([backbone2, head2], schedule)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.get_last_lr() == pytest.approx([0.05, 0.2]) and head2.param_groups[0]["lr"] == pytest.approx(0.2)
    with pytest.raises(TypeError, match="has no param_groups"):
        ScheduledLR([object()], schedule)  # type: ignore[list-item]


def test_schedule_from_config_resolves_epochs():
    s = schedule_from_config(ScheduleConfig(warmup_epochs=0.5, decay="cosine"), epochs=3, steps_per_epoch=10)
    assert (s.total_steps, s.warmup_steps, s.decay) == (30, 5, "cosine")
    s = schedule_from_config(ScheduleConfig(warmup_steps=2, total_steps=7, power=1.5), epochs=3, steps_per_epoch=10)
    assert (s.total_steps, s.warmup_steps, s.power) == (7, 2, 1.5)
    assert schedule_from_config(ScheduleConfig(), epochs=2, steps_per_epoch=4).warmup_steps == 0
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1, got 0"):
        schedule_from_config(ScheduleConfig(), epochs=2, steps_per_epoch=0)
