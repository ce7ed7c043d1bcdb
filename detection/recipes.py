"""Detection transfer's recipes (detection/train_torchvision.py --recipe): MoCo's detection
configs (facebookresearch/moco detection/configs) written out, and a CPU demo. Flags given on the
command line win over the recipe (`fill_unset`)."""

from __future__ import annotations

import argparse
from typing import Any

_VOC_SIZES = tuple(range(480, 801, 32))  # MoCo's VOC MIN_SIZE_TRAIN
_COCO_SIZES = tuple(range(640, 801, 32))
_COMMON = dict(head="c4", norm="syncbn", batch_size=16, lr=0.02, test_size=800, max_size=1333, precise_bn_iters=200,
               roi_batch_size=512, fpn_channels=256, box_head_dim=1024, workers=4, checkpoint_period=5000)
DETECTION: dict[str, dict[str, Any]] = {
    "voc": dict(_COMMON, train=["voc_2007_trainval", "voc_2012_trainval"], test=["voc_2007_test"], max_iter=24000,
                steps=[18000, 22000], warmup_iters=100, min_size=list(_VOC_SIZES)),
    "coco_1x": dict(_COMMON, train=["coco_2017_train"], test=["coco_2017_val"], max_iter=90000,
                    steps=[60000, 80000], warmup_iters=1000, min_size=list(_COCO_SIZES)),
    "coco_2x": dict(_COMMON, train=["coco_2017_train"], test=["coco_2017_val"], max_iter=180000,
                    steps=[120000, 160000], warmup_iters=1000, min_size=list(_COCO_SIZES)),
    # Minutes on a CPU: ResNet-18 FPN, narrow FPN and box head, on detection/make_synthetic.py's
    # default data (64-pixel images of three shapes); detection/README.md gives the AP and time measured.
    "demo": dict(head="fpn", arch="resnet18", norm="bn", batch_size=8, lr=0.04, train=["voc_2007_trainval"],
                 test=["voc_2007_test"], max_iter=600, steps=[450, 550], warmup_iters=50, min_size=[64],
                 test_size=64, max_size=64, precise_bn_iters=0, roi_batch_size=64, fpn_channels=32,
                 box_head_dim=128, workers=0, checkpoint_period=200),
}


def fill_unset(args: argparse.Namespace, recipe: dict[str, Any]) -> argparse.Namespace:
    """A copy of `args` whose unset (None) flags take the recipe's value (explicit flags win)."""
    out = argparse.Namespace(**vars(args))
    for key, value in recipe.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    return out
