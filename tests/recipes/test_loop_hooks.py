"""The loop binds guided stages, tells evolving stages the progress, and steps EMA teachers."""

import torch
from torch import nn

from masklab.objectives import EMATeacher, ObjectiveOutput
from masklab.pipeline import Batch, Chain, Stage
from masklab.recipes.train import bind_guidance, set_progress, step_teachers


class GuidedStage(Stage):
    guide_kind = "saliency"

    def __init__(self):
        super().__init__()
        self.guide = None
        self.progress = None

    def bind(self, guide):
        self.guide = guide

    def set_progress(self, t):
        self.progress = t

    def forward(self, batch):
        return batch.with_extras(guided=self.guide(batch.images))


class WithTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = nn.Linear(2, 2)
        self.teacher = EMATeacher(self.student, base=0.5, final=0.5)

    def guidance(self, kind):
        assert kind == "saliency"
        return lambda images: images.mean(dim=(1, 2, 3))

    def teachers(self):
        return [(self.teacher, self.student)]

    def forward(self, batch):
        return ObjectiveOutput(self.student(batch.images.flatten(1)[:, :2]).sum())


def test_hooks():
    stage, objective = GuidedStage(), WithTeacher()
    chain = Chain([stage])
    assert bind_guidance(chain, objective) == 1
    out = chain(Batch(images=torch.ones(2, 3, 4, 4)))
    assert out.extras["guided"].tolist() == [1.0, 1.0]
    set_progress(chain, 1.7)
    assert stage.progress == 1.0
    with torch.no_grad():
        objective.student.weight.add_(2.0)
    before = objective.teacher.module.weight.clone()
    assert step_teachers(objective, 0.3) == 1
    torch.testing.assert_close(objective.teacher.module.weight, before + 1.0)


def test_the_guide_runs_under_the_steps_autocast_and_its_maps_come_back_float32():
    import contextlib

    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    computed = []

    class Objective(nn.Module):
        def guidance(self, kind):
            def guide(images, grid=None):
                maps = torch.nn.functional.linear(images, torch.ones(4, 4))
                computed.append(maps.dtype)
                return maps

            return guide

    stage = GuidedStage()
    assert bind_guidance(Chain([stage]), Objective(), autocast) == 1
    maps = stage.guide(torch.ones(2, 3, 4, 4))
    assert entered == [True] and computed == [torch.bfloat16]  # the guide's pass ran under the autocast
    assert maps.dtype == torch.float32 and maps.eq(4.0).all()
    plain = GuidedStage()
    bind_guidance(Chain([plain]), Objective())
    plain.guide(torch.ones(2, 3, 4, 4))
    assert entered == [True] and computed == [torch.bfloat16, torch.float32]  # no autocast given: as it is


def test_a_guided_stage_without_guidance_is_an_error():
    import pytest

    with pytest.raises(ValueError, match=r"GuidedStage needs 'saliency' guidance but Linear offers none"):
        bind_guidance(Chain([GuidedStage()]), nn.Linear(1, 1))


class Refreshing(Stage):
    """A cache stage written only against the protocol: due at even epochs."""

    def __init__(self):
        super().__init__()
        self.progress = None

    def refresh_due(self, epoch, epochs):
        return epoch % 2 == 0

    def refresh(self, batches, grid, gather=None):
        raise AssertionError("not called here")

    def forward(self, batch):
        return batch


def test_the_loop_drives_stages_by_their_declared_abilities_only():
    plain, refreshing = Stage(), Refreshing()
    chain = Chain([plain, refreshing])
    assert bind_guidance(chain, nn.Linear(1, 1)) == 0  # nothing guided: no guidance needed
    set_progress(chain, 0.5)
    assert refreshing.progress is None  # it has a cache, not a progress
    assert step_teachers(nn.Linear(1, 1), 0.5) == 0
