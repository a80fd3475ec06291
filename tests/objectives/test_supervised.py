import pytest
import torch

from masklab.objectives import Supervised
from masklab.pipeline import Batch


def test_loss_is_the_cross_entropy_against_mixed_then_smoothed_targets_by_hand():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    model = Supervised(net, num_classes=3, label_smoothing=0.3)
    images, labels = torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 1])
    lam, partner = torch.tensor([0.25, 0.5, 1.0, 0.75]), torch.tensor([1, 0, 3, 2])
    mix = {"images": images, "own": torch.ones(4, 1, 4, 4), "lam": lam, "partner": partner, "inverse": partner}
    out = model(Batch(images=torch.zeros_like(images), labels=labels, mix=mix))
    # Sample 0 keeps a quarter of class 0 and takes three quarters of its partner's class 1, and so on;
    # then 30% of the mass is spread evenly over the 3 classes.
    mixed = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 0.75, 0.25]])
    targets = mixed * 0.7 + 0.1
    log_p = torch.log_softmax(net(images), dim=1)
    assert out.loss.item() == pytest.approx(-(targets * log_p).sum(dim=1).mean().item(), rel=1e-6)
    assert out.logs["accuracy"].item() == pytest.approx((net(images).argmax(1) == labels).float().mean().item())
