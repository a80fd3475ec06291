import torch

from masklab.recipes.build import build_loader, build_model, sync_batchnorm
from masklab.recipes.config import load_config
from masklab.transforms import MixMask, Normalize, Views

SMALL = ["data.length=32", "data.batch_size=8", "model.kwargs={channels: [8, 16, 32, 64], stem_width: 8}"]


def test_siamese_loader_cuts_views_before_normalising_and_mixes_the_query_view_after():
    cfg = load_config("mixmask_moco", SMALL)
    loader = build_loader(cfg, "train", torch.device("cpu"), "cnn")
    assert [type(s) for s in loader.chain.stages] == [Views, Normalize, MixMask]
    assert loader.chain.stages[2].view == 0 and loader.chain.stages[2].grid == 4
    batch = next(iter(loader))
    own = batch.mix["own"].bool()
    torch.testing.assert_close(
        batch.mix["images"], torch.where(own, batch.views[0], batch.views[0][batch.mix["partner"]])
    )
    # Evaluation loaders see whole images: no views, no mixing.
    assert [type(s) for s in build_loader(cfg, "test", torch.device("cpu"), "cnn", train=False).chain.stages] == [
        Normalize
    ]


def test_sync_batchnorm_only_for_several_gpu_processes():
    cfg = load_config("moco", SMALL)
    model = build_model(cfg)
    assert sync_batchnorm(cfg, model, torch.device("cpu"), 2) is model
    assert sync_batchnorm(cfg, model, torch.device("cuda"), 1) is model
    converted = sync_batchnorm(cfg, build_model(cfg), torch.device("cuda"), 2)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.momentum.modules())
