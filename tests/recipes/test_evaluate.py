import torch

from masklab.recipes.evaluate import knn_accuracy, knn_predict, linear_probe_accuracy


def clustered(n_per_class=50, classes=4, dim=16, spread=0.1, seed=0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_knn_on_separable_features_is_near_perfect():
    train, test = clustered(seed=0), clustered(seed=1)
    assert knn_accuracy(*train, *test) > 0.98


def test_knn_on_random_features_is_chance():
    g = torch.Generator().manual_seed(0)
    train_x, train_y = torch.randn(2000, 32, generator=g), torch.randint(0, 4, (2000,), generator=g)
    test_x, test_y = torch.randn(2000, 32, generator=g), torch.randint(0, 4, (2000,), generator=g)
    assert abs(knn_accuracy(train_x, train_y, test_x, test_y) - 0.25) < 0.04


def test_knn_weights_votes_by_similarity():
    # Two neighbours of class 1 far away, one of class 0 very close: temperature weighting picks 0.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    pred = knn_predict(train, labels, torch.tensor([[1.0, 0.05]]), num_classes=2, k=3, temperature=0.07)
    assert pred.tolist() == [0]


def test_linear_probe_separates_clusters():
    train, test = clustered(seed=0), clustered(seed=1)
    assert linear_probe_accuracy(*train, *test, epochs=100) > 0.98
