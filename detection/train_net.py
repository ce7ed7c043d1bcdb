#!/usr/bin/env python
"""MoCo's Detectron2 fine-tuning, for users who have Detectron2 (it is not on PyPI).

    python detection/convert_to_detectron2.py runs/moco-resnet50-imagenet/checkpoint.pth.tar moco_r50.pkl
    python detection/train_net.py --config-file detection/configs/voc_R_50_C4_24k_moco.yaml \\
        --num-gpus 8 MODEL.WEIGHTS ./moco_r50.pkl OUTPUT_DIR runs/d2-voc-moco

Flags are Detectron2's (`--num-gpus`, `--resume`, `--eval-only`, `--num-machines`, ...), followed
by config overrides. Datasets are Detectron2's builtin names, found under $DETECTRON2_DATASETS
(default ./datasets). Detectron2 is imported only when this script runs, so the module imports,
and its tests run, without it.
"""

from __future__ import annotations

import os
import sys

INSTALL_HINT = (
    "Detectron2 is not installed, and it is not on the package registries: build it from source against "
    "your PyTorch, e.g.\n"
    "    python -m pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "(needs a C++ compiler, and the CUDA toolkit matching torch.version.cuda for GPU kernels; see "
    "https://detectron2.readthedocs.io/en/latest/tutorials/install.html).\n"
    "Without Detectron2, fine-tune with detection/train_torchvision.py, which needs only torchvision."
)


def detectron2_available() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def register_extra_norm_head() -> None:
    """Register `Res5ROIHeadsExtraNorm`: Detectron2's C4 box head (res5 on 14 x 14 RoI features)
    with one more normalisation layer (cfg.MODEL.RESNETS.NORM) after res5: the detector of the
    MoCo paper's detection experiments (He et al., "Momentum Contrast for Unsupervised Visual
    Representation Learning", CVPR 2020)."""
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        def __init__(self, cfg, input_shape):
            super().__init__(cfg, input_shape)
            self.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels))


def build_trainer_class():
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "")
            if kind == "pascal_voc":
                return PascalVOCDetectionEvaluator(dataset_name)  # AP (0.50:0.95), AP50, AP75
            if kind == "coco":
                return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
            raise ValueError(f"no evaluator for dataset '{dataset_name}' (evaluator_type '{kind}')")

    return Trainer


def configured_weights(config_file: str, opts: list[str]) -> str:
    """MODEL.WEIGHTS as the config file (and its _BASE_ chain) and the command line's overrides set
    it - read without Detectron2, so that bad input is reported before `launch` starts a process
    per GPU (each of which would print the same error)."""
    import yaml

    weights, path = "", os.path.abspath(config_file)
    chain = []
    while path:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
        chain.append(cfg)
        base = cfg.get("_BASE_")
        path = os.path.join(os.path.dirname(path), base) if base else None
    for cfg in reversed(chain):  # the base first, the file itself last
        weights = (cfg.get("MODEL") or {}).get("WEIGHTS", weights)
    for key, value in zip(opts[::2], opts[1::2]):
        if key == "MODEL.WEIGHTS":
            weights = value
    return weights


def check_before_launch(args) -> str | None:
    """Why this command cannot run, or None: checked once, before any process starts."""
    if not os.path.isfile(args.config_file):
        return f"--config-file {args.config_file} does not exist"
    weights = configured_weights(args.config_file, args.opts)
    if not weights and not args.resume:
        return ("MODEL.WEIGHTS is empty. Convert a pretrained checkpoint with `python detection/convert_to_detectron2.py "
                "CHECKPOINT.pth.tar OUT.pkl` and add `MODEL.WEIGHTS OUT.pkl` to the command line (or `MODEL.WEIGHTS "
                "random` to train from scratch).")
    if weights and weights != "random" and "://" not in weights and not os.path.isfile(weights):
        return f"MODEL.WEIGHTS {weights} does not exist (convert a checkpoint with detection/convert_to_detectron2.py)"
    return None


def setup(args):
    from detectron2.config import get_cfg
    from detectron2.engine import default_setup

    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.WEIGHTS == "random":
        cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    from detectron2.checkpoint import DetectionCheckpointer

    register_extra_norm_head()
    Trainer = build_trainer_class()
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv: list[str] | None = None) -> int:
    if not detectron2_available():
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from detectron2.engine import default_argument_parser, launch

    args = default_argument_parser().parse_args(argv)
    problem = check_before_launch(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
