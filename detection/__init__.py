"""Detection transfer: a Detectron2 weight converter and configs, and a torchvision Faster R-CNN
path (FPN or C4 head) that runs with what pip installs. See detection/README.md."""
