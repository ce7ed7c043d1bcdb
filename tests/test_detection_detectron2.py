"""The Detectron2 glue: configs say MoCo's recipe, train_net.py runs (or explains) without Detectron2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO))

from detection import train_net  # noqa: E402  (must import without Detectron2)

CONFIGS = REPO / "detection" / "configs"


def read_simple_yaml(path: Path) -> dict:
    """The YAML subset these configs use (nested 'KEY: value' mappings, two-space indents), read
    without PyYAML, which this environment may lack. Values stay strings."""
    root: dict = {}
    stack = [(-1, root)]
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if value.strip():
            parent[key] = value.strip().strip('"')
        else:
            parent[key] = {}
            stack.append((indent, parent[key]))
    return root


def merged(name: str) -> dict:
    """A config with its _BASE_ chain merged in, as Detectron2's merge_from_file does."""
    cfg = read_simple_yaml(CONFIGS / name)
    base = cfg.pop("_BASE_", None)
    if base is None:
        return cfg
    out = merged(base)

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict):
                merge(dst.setdefault(k, {}), v)
            else:
                dst[k] = v

    merge(out, cfg)
    return out


def get(cfg: dict, dotted: str) -> str:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("name,iters,steps,train,classes,mask", [
    ("voc_R_50_C4_24k_moco.yaml", "24000", "(18000, 22000)", '("voc_2007_trainval", "voc_2012_trainval")', "20", "False"),
    ("coco_R_50_C4_1x_moco.yaml", "90000", "(60000, 80000)", '("coco_2017_train",)', "80", "True"),
    ("coco_R_50_C4_2x_moco.yaml", "180000", "(120000, 160000)", '("coco_2017_train",)', "80", "True"),
])
def test_moco_recipe_in_configs(name, iters, steps, train, classes, mask):
    cfg = merged(name)
    assert get(cfg, "MODEL.BACKBONE.FREEZE_AT") == "0"  # every stage fine-tuned
    assert get(cfg, "MODEL.RESNETS.NORM") in ("SyncBN", "naiveSyncBN")
    assert get(cfg, "MODEL.RESNETS.DEPTH") == "50" and get(cfg, "MODEL.RESNETS.OUT_FEATURES") == '["res4"]'  # C4
    assert get(cfg, "MODEL.ROI_HEADS.NAME") == "Res5ROIHeadsExtraNorm"
    assert get(cfg, "MODEL.ROI_HEADS.NUM_CLASSES") == classes and get(cfg, "MODEL.MASK_ON") == mask
    # torchvision-style backbones: RGB, ImageNet mean/std x 255, stride in the 3x3 conv.
    assert get(cfg, "INPUT.FORMAT") == "RGB" and get(cfg, "MODEL.RESNETS.STRIDE_IN_1X1") == "False"
    mean = [float(v) for v in get(cfg, "MODEL.PIXEL_MEAN").strip("[]").split(",")]
    std = [float(v) for v in get(cfg, "MODEL.PIXEL_STD").strip("[]").split(",")]
    assert mean == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert std == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])
    assert get(cfg, "MODEL.WEIGHTS") == ""  # the converted checkpoint comes from the command line
    assert get(cfg, "SOLVER.MAX_ITER") == iters and get(cfg, "SOLVER.STEPS") == steps
    assert get(cfg, "SOLVER.IMS_PER_BATCH") == "16" and get(cfg, "SOLVER.BASE_LR") == "0.02"
    assert get(cfg, "DATASETS.TRAIN") == train
    assert get(cfg, "TEST.PRECISE_BN.ENABLED") == "True"


def test_supervised_baselines_keep_detectron2_weights():
    for name in ("voc_R_50_C4_24k.yaml", "coco_R_50_C4_1x.yaml", "coco_R_50_C4_2x.yaml"):
        cfg = merged(name)
        assert get(cfg, "MODEL.WEIGHTS").endswith("MSRA/R-50.pkl")
        assert "FORMAT" not in cfg.get("INPUT", {})  # Detectron2's BGR default for the Caffe weights


def test_configs_parse_with_pyyaml_when_installed():
    yaml = pytest.importorskip("yaml")
    for path in CONFIGS.glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_train_net_explains_how_to_install_detectron2(capsys):
    if train_net.detectron2_available():
        pytest.skip("Detectron2 is installed")
    assert train_net.cli(["--config-file", str(CONFIGS / "voc_R_50_C4_24k_moco.yaml")]) == 2
    err = capsys.readouterr().err
    assert "git+https://github.com/facebookresearch/detectron2.git" in err and "train_torchvision.py" in err


def test_extra_norm_head_registers_with_detectron2():
    pytest.importorskip("detectron2")
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

    train_net.register_extra_norm_head()
    train_net.register_extra_norm_head()  # idempotent
    assert "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY


def test_train_net_refuses_missing_weights_before_starting_any_process(tmp_path):
    pytest.importorskip("yaml")
    from argparse import Namespace

    moco = str(CONFIGS / "voc_R_50_C4_24k_moco.yaml")
    supervised = str(CONFIGS / "coco_R_50_C4_1x.yaml")

    def check(config, opts, resume=False):
        return train_net.check_before_launch(Namespace(config_file=config, opts=opts, resume=resume))

    assert "MODEL.WEIGHTS is empty" in check(moco, [])
    assert check(moco, [], resume=True) is None  # resuming OUTPUT_DIR's last checkpoint
    assert "does not exist" in check(moco, ["MODEL.WEIGHTS", str(tmp_path / "missing.pkl")])
    (tmp_path / "w.pkl").write_bytes(b"x")
    assert check(moco, ["SOLVER.MAX_ITER", "10", "MODEL.WEIGHTS", str(tmp_path / "w.pkl")]) is None
    assert check(moco, ["MODEL.WEIGHTS", "random"]) is None
    assert check(supervised, []) is None  # the base config's detectron2:// weights
    assert "does not exist" in check(str(tmp_path / "nope.yaml"), [])
