"""Objective abilities are declared protocols: guidance for guided stages, EMA teachers to step."""

import torch

from masklab.objectives import MAE, EMATeacher, Siamese, SimMIM, Supervised, build_backbone
from masklab.objectives.protocols import HasTeachers, OffersGuidance


def tiny_vit():
    return build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)


def test_masked_image_objectives_offer_guidance_and_list_their_teacher():
    mae = MAE(tiny_vit(), decoder_dim=32, decoder_depth=1, teacher_decay=0.99)
    assert isinstance(mae, OffersGuidance) and isinstance(mae, HasTeachers)
    [(teacher, student)] = mae.teachers()
    assert isinstance(teacher, EMATeacher) and student is mae.backbone
    simmim = SimMIM(tiny_vit())
    assert isinstance(simmim, HasTeachers) and simmim.teachers() == []  # no teacher asked for: none to step
    maps = simmim.guidance("saliency")(torch.rand(2, 3, 32, 32), (4, 4))
    assert maps.shape == (2, 4, 4)


def test_momentum_encoders_are_teachers():
    byol = Siamese(build_backbone("resnet18"), "byol", hidden=16, dim=8, pred_hidden=16)
    [(teacher, _)] = byol.teachers()
    assert isinstance(byol, HasTeachers) and teacher is byol.momentum


def test_a_supervised_classifier_has_neither_ability():
    classifier = Supervised(torch.nn.Linear(4, 3), num_classes=3)
    assert not isinstance(classifier, (OffersGuidance, HasTeachers))
