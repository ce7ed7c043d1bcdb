#!/usr/bin/env python
r"""Self-supervised pretraining: MoCo v1/v2, MoCo v3, BYOL, SimCLR or DINO, one DDP process per GPU.

    python main_pretrain.py                                   # the embedded demo, one CPU process
    python main_pretrain.py --method byol /path/to/folder     # one process (a GPU if there is one)
    torchrun --nproc_per_node=8 main_pretrain.py --preset mocov2 /imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \
        main_pretrain.py --preset byol /imagenet
    python main_pretrain.py --multiprocessing-distributed --world-size 1 --rank 0 \
        --dist-url tcp://localhost:10001 --mlp --moco-t 0.2 --aug-plus --cos /imagenet   # MoCo's way

Running the same command again resumes from OUTPUT_DIR/checkpoint.pth.tar (what torchrun's
restarts need). --batch-size is the global batch over all processes. This file holds the
arguments and the building; the epoch loop is selfsup.engine.fit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import _bootstrap  # noqa: F401  (first: a plain clone finds selfsup in its ssl/)

from selfsup import recipes
from selfsup.accumulation import Accumulation, micro_batches
from selfsup.backbones import ARCH_HELP, ARCHS
from selfsup.backbones import flag_options as backbone_flag_options
from selfsup.builder import build_model, check_sync_bn
from selfsup.checkpoint import check_writable
from selfsup.cli import add_moco_launcher_args, agree_on_error, check_numbers, launch, report, write_args, write_json
from selfsup.data import DEMO_ROOT, fashion_mnist_root, report_unreadable, resolve_split_dir
from selfsup.data.augmentations import AUGMENTATIONS
from selfsup.data.pipeline import AUG_BACKENDS, build_pretrain_pipeline
from selfsup.distributed import DistInfo, add_device_args, configure_kernels, run_in_process_group, wrap_ddp
from selfsup.engine import AMP_DTYPES, StepContext, checkpoint_state, fit, resume, start_lines
from selfsup.errors import INPUT_ERRORS, UsageError
from selfsup.meters import MetricsWriter, setup_logging
from selfsup.methods import METHODS
from selfsup.monitor import folder_monitor
from selfsup.networks import compile_or_warn
from selfsup.optim import OPTIMIZERS, WD_EXCLUDE, build_optimizer
from selfsup.resume import Checkpointer, default_run_folder, run_definition, run_holding_folder
from selfsup.rng import MicroStreams
from selfsup.stopping import StopRequest

logger = logging.getLogger("main_pretrain")


def get_args_parser() -> argparse.ArgumentParser:
    """Flags of facebookresearch/moco's main_moco.py (same names and meanings) plus ours.

    Hyperparameters default to None: the value then comes from --preset, the method's defaults
    or the demo recipe (selfsup.config: the layers; the recipes live with their methods); a flag
    given on the command line always wins.
    """
    p = argparse.ArgumentParser("Self-supervised pretraining", add_help=False)
    by_method = recipes.defaults_by_method  # each method's default, for the help
    p.add_argument("data", nargs="?", default=None, help="ImageFolder root (ROOT/train/<class>/...), a folder of images, "
                   "or Fashion-MNIST ('fashion-mnist' or its idx folder); omit it for the embedded demo")
    # No `choices`: an unknown name is one line naming the valid ones (recipes.resolve), no usage.
    p.add_argument("--method", default=None,
                   help=f"{', '.join(METHODS)} (default: {recipes.DEFAULT_METHOD}; the demo without a data folder: "
                        f"{recipes.DEMO_METHOD})")
    p.add_argument("--preset", default=None,
                   help=f"a paper's recipe in one word, or small-<method> for small images (docs/CONFIG.md): "
                        f"{', '.join(recipes.PRESETS)}; explicit flags override it")
    g = p.add_argument_group("data")
    g.add_argument("-j", "--workers", default=None, type=int,
                   help="data loading workers per process (default: the CPUs per process, less one; 1 to 8)")
    g.add_argument("--image-size", default=None, type=int, help="crop size (default: 224)")
    g.add_argument("--aug", default=None, choices=list(AUGMENTATIONS), help="augmentation preset (default: the method's)")
    g.add_argument("--aug-plus", action="store_true", help="MoCo v2's augmentation (same as --aug moco_v2)")
    g.add_argument("--verify-images", action="store_true", help="decode every image first and list unreadable ones")
    g = p.add_argument_group("model (MoCo's flags; dim, m and t also serve BYOL and SimCLR)")
    g.add_argument("-a", "--arch", default=None, choices=ARCHS, metavar="ARCH",
                   help=f"backbone (default: resnet50): {', '.join(ARCHS)}. {ARCH_HELP}")
    g.add_argument("--small-stem", default=None, action=argparse.BooleanOptionalAction,
                   help="3x3 stride-1 stem without max-pool, for 28-64 pixel images")
    g.add_argument("--stop-grad-conv1", default=None, action=argparse.BooleanOptionalAction,
                   help="ViTs: freeze the random patch projection (moco-v3's stabiliser; its ViT presets)")
    g.add_argument("--zero-init-residual", default=None, action=argparse.BooleanOptionalAction,
                   help=f"ResNets: zero the last BatchNorm of each residual block ({by_method('zero_init_residual')})")
    g.add_argument("--vit-init", default=None, choices=("mocov3", "dino"),
                   help="ViTs: moco-v3's fixed sin-cos position embedding and init (default), or DINO's learned ones")
    g.add_argument("--drop-path-rate", default=None, type=float, help="ViTs: stochastic depth (DINO's student: 0.1)")
    g.add_argument("--moco-dim", default=None, type=int, help=f"output dim ({by_method('moco_dim')})")
    g.add_argument("--moco-k", default=None, type=int, help=f"MoCo queue size ({by_method('moco_k')})")
    g.add_argument("--moco-m", "--momentum-teacher", default=None, type=float, dest="moco_m",
                   help=f"key/target encoder (DINO: teacher) momentum ({by_method('moco_m')})")
    g.add_argument("--moco-t", default=None, type=float, help=f"softmax temperature ({by_method('moco_t')})")
    g.add_argument("--moco-m-cos", default=None, action=argparse.BooleanOptionalAction,
                   help=f"raise the momentum to 1 along a cosine (BYOL's schedule; {by_method('moco_m_cos')})")
    g.add_argument("--mlp", default=None, action=argparse.BooleanOptionalAction,
                   help=f"MoCo v2 projection head ({by_method('mlp')})")
    g.add_argument("--mlp-dim", default=None, type=int, help=f"hidden dim of the heads ({by_method('mlp_dim')})")
    g.add_argument("--bn-splits", default=None, type=int,
                   help="emulate shuffle BN on one process over this many sub-batches (default: 1 = off)")
    g.add_argument("--no-shuffle-bn", dest="shuffle_bn", action="store_false", help="MoCo without shuffle BN")
    g.add_argument("--sync-bn", default=None, action=argparse.BooleanOptionalAction,
                   help="BatchNorm over the global batch (SyncBatchNorm; CUDA + NCCL; the byol and simclr presets)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", default=None, type=int, help="total epochs (default: 200)")
    g.add_argument("-b", "--batch-size", default=None, type=int,
                   help="GLOBAL batch size over all processes (default: 256)")
    g.add_argument("--accum-iter", default=None, type=int,
                   help="K micro-batches per process and optimizer step: W processes train what W x K would, same "
                        "global batch (README: Fewer GPUs than the paper)")
    g.add_argument("--micro-batch", default=None, type=int,
                   help="images per micro-batch, the other way to say --accum-iter (K = batch / (processes x N))")
    g.add_argument("--lr", "--learning-rate", default=None, type=float, dest="lr",
                   help="initial learning rate (default: 0.03; BYOL/SimCLR presets scale it with the batch)")
    g.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="sgd (default), lars, or adamw")
    g.add_argument("--wd-exclude", default=None, choices=WD_EXCLUDE,
                   help="no weight decay on: none (default; moco-v3, MoCo), bias-norm (biases, 1-D: DINO), "
                        "bias-norm-tokens (and a ViT's position embedding and tokens: timm, MAE)")
    g.add_argument("--classic-momentum", default=None, action=argparse.BooleanOptionalAction,
                   help="LARS with the lr inside the momentum, as SimCLR's code (default for SimCLR; see optim.LARS)")
    g.add_argument("--lars-eta", default=None, type=float,
                   help="LARS's trust coefficient (default 0.001, the papers'; the small-image presets: 0.02)")
    g.add_argument("--momentum", default=None, type=float, help="optimizer momentum (default: 0.9)")
    g.add_argument("--wd", "--weight-decay", default=None, type=float, dest="wd", help="weight decay (default: 1e-4)")
    g.add_argument("--cos", default=None, action=argparse.BooleanOptionalAction, help="cosine lr schedule")
    g.add_argument("--schedule", default=None, nargs="*", type=int,
                   help="epochs at which to drop the lr by 10x when not --cos (default: 120 160)")
    g.add_argument("--warmup-epochs", default=None, type=float, help="linear lr warmup epochs (default: 0)")
    g.add_argument("--min-lr", default=None, type=float, help="the cosine schedule's floor (default 0; DINO 1e-6)")
    g.add_argument("--weight-decay-end", default=None, type=float,
                   help="weight decay along a cosine from --wd to this (DINO: 0.04 -> 0.4; default: constant)")
    g.add_argument("--seed", default=0, type=int, help="seed of initialisation, data order and augmentation (default: 0)")
    for method in METHODS.values():  # each method's own flags (Method.flags)
        if method.flags:
            g = p.add_argument_group(f"{method.name} (its reference's flags)")
            for flag, options in method.flags:
                g.add_argument(flag, default=None, **options)
    g = p.add_argument_group("distributed (torchrun needs none of these)")
    add_device_args(g, moco_gpu=True)
    add_moco_launcher_args(g)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--output-dir", default=None,
                   help="where checkpoints and logs go (default: runs/<method>-<arch>-<data folder name>)")
    g.add_argument("--resume", default="", type=str,
                   help="checkpoint to resume from (default: OUTPUT_DIR/checkpoint.pth.tar if present)")
    g.add_argument("--no-resume", action="store_true", help="start afresh, in OUTPUT_DIR-2 (-3, ...) if it holds a run")
    g.add_argument("--accept-changes", action="store_true", help="continue OUTPUT_DIR's run with changed values")
    g.add_argument("--start-epoch", default=None, type=int, help="manual epoch number (useful on restarts)")
    g.add_argument("--save-freq", default=10, type=int, help="keep checkpoint_%%04d.pth.tar every N epochs")
    g.add_argument("--save-every-epochs", default=1, type=int, help="checkpoint every N epochs and after the last")
    g.add_argument("--save-every-steps", default=0, type=int, help="also checkpoint every N optimizer steps (0: off)")
    g = p.add_argument_group("monitoring")
    g.add_argument("-p", "--print-freq", default=10, type=int, help="print every N steps (default: 10)")
    g.add_argument("--knn-every", default=None, type=int,
                   help="online kNN accuracy every N epochs on --knn-data (0: off; default: 0, demo: 1)")
    g.add_argument("--knn-data", default=None, help="labelled root with train/ and val/ for it (default: the data)")
    g.add_argument("--knn-k", default=200, type=int, help="neighbours of the online kNN (default: 200)")
    g.add_argument("--knn-t", default=0.07, type=float, help="temperature of the online kNN (default: 0.07)")
    g.add_argument("--knn-subset", default=None, type=int, help="online kNN on at most N bank images, N/5 queries")
    g = p.add_argument_group("performance")
    g.add_argument("--amp", default=None, choices=list(AMP_DTYPES), help="mixed precision (default: none)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument("--aug-backend", default="auto", choices=AUG_BACKENDS,
                   help="auto (default: memory up to 64 px, else batched), batched (crops in the workers, colour on "
                        "the device), memory, reference (MoCo's per-image PIL); docs/PERFORMANCE.md")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks (where it works, else a warning)")
    g.add_argument("--deterministic", action="store_true", help="deterministic GPU kernels (cuDNN's autotuner off)")
    return p


def resolve_config(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset hyperparameters from the preset/method/demo recipes; check the combination."""
    explicit = {k: getattr(args, k) for k in recipes.CONFIG_KEYS if getattr(args, k) is not None}
    if args.aug_plus:
        explicit.setdefault("aug", "moco_v2")
    demo = args.data is None
    if args.no_resume and args.resume:
        raise UsageError("--no-resume starts afresh, --resume continues a checkpoint: give one of them")
    try:
        cfg = recipes.resolve(args.method, args.preset, demo, explicit)
    except ValueError as e:
        raise UsageError(str(e)) from e
    out = argparse.Namespace(**{**vars(args), **cfg})
    out.demo = demo
    out.output_dir = out.output_dir or default_run_folder(out.method, out.arch, out.data)
    out.data = str(DEMO_ROOT) if demo else out.data
    check_numbers(out, positive=("epochs", "batch_size", "accum_iter", "micro_batch", "lr", "image_size", "moco_dim",
                                 "moco_k", "moco_t", "mlp_dim", "bn_splits", "print_freq", "save_freq", "save_every_epochs",
                                 "knn_k", "knn_t", "knn_subset", "lars_eta"),
                  non_negative=("workers", "wd", "momentum", "warmup_epochs", "save_every_steps", "knn_every",
                                "start_epoch", "schedule"), fractions=("moco_m",))
    return out


def build(args: argparse.Namespace, dist_info: DistInfo):
    """Validate inputs and build data, model and optimizer. Raises one of INPUT_ERRORS on bad input."""
    args.accum_iter, local_batch = micro_batches(args.batch_size, dist_info.world_size, args.accum_iter,
                                                 args.micro_batch)
    args.sync_bn = check_sync_bn(args.sync_bn, args.accum_iter, dist_info)
    if dist_info.is_main:
        check_writable(args.output_dir, create=False)  # created when the run takes it (RunLock)
    data_dir = args.data if fashion_mnist_root(args.data) else resolve_split_dir(args.data, "train")
    pipeline = build_pretrain_pipeline(str(data_dir), aug=args.aug, image_size=args.image_size, batch_size=local_batch,
                                       workers=args.workers, dist=dist_info, seed=args.seed, backend=args.aug_backend,
                                       channels_last=args.channels_last, out_dtype=AMP_DTYPES[args.amp] or torch.float32,
                                       accum=args.accum_iter, aug_options=recipes.aug_options(vars(args)))
    args.data_id = pipeline.data_id  # what the data is, for the run definition (selfsup.resume.run_definition)
    configure_kernels(args.deterministic)
    torch.manual_seed(args.seed)
    model = build_model(args.method, args.arch, small_stem=args.small_stem, sync_bn=args.sync_bn,
                        backbone_options=backbone_flag_options(args.arch, vars(args)),
                        **METHODS[args.method].options(vars(args)))
    for warning in model.data_warnings(pipeline.num_images) if dist_info.is_main else ():
        logger.warning(warning)
    model.to(dist_info.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_or_warn(model, dist_info.device)
    optimizer = build_optimizer(args.optimizer, [(n, p) for n, p in model.named_parameters() if p.requires_grad], args.lr,
                                args.momentum, args.wd, classic_momentum=args.classic_momentum,
                                trust_coefficient=args.lars_eta, wd_exclude=args.wd_exclude)
    scaler = torch.amp.GradScaler(dist_info.device.type, enabled=args.amp == "fp16")
    monitor = None
    if args.knn_every > 0:
        monitor = folder_monitor(args.knn_data or args.data, args.image_size, local_batch, dist_info.device,
                                 min(args.workers, 4), args.knn_k, args.knn_t, subset=args.knn_subset)
    return model, optimizer, scaler, pipeline, monitor


def train(args: argparse.Namespace, dist_info: DistInfo, stop: StopRequest | None = None) -> int:
    """Check every input and build; then, holding the output folder (one run per folder), train."""
    setup_logging(dist_info.rank)
    return run_holding_folder(args, dist_info, lambda: build(args, dist_info),
                              lambda built: run(args, dist_info, stop, *built))


def run(args: argparse.Namespace, dist_info: DistInfo, stop: StopRequest | None, model, optimizer, scaler, pipeline,
        monitor) -> int:
    """Resume (or start) the run in its folder and train it; the exit status."""
    output_dir = Path(args.output_dir)
    setup_logging(dist_info.rank, output_dir)
    if args.verify_images and not fashion_mnist_root(args.data):  # every process decodes its share of the files
        report_unreadable(resolve_split_dir(args.data, "train"), dist_info, args.workers)
    steps = pipeline.sampler.steps_per_epoch
    # Every micro-batch draws from its own random stream, as a process of W x K would (selfsup.rng).
    streams = MicroStreams(args.accum_iter) if args.accum_iter > 1 else None
    start = error = None
    try:
        start = resume(model, optimizer, scaler, args, dist_info, steps, streams)
    except INPUT_ERRORS as e:
        error = e
    if agree_on_error(error, dist_info):
        return 2
    write_args(output_dir, args, dist_info)
    write_json(output_dir / "run.json", run_definition(vars(args)), dist_info)
    for line in start_lines(vars(args), dist_info, pipeline.description):
        logger.info(line)

    def state(**position) -> dict:
        return checkpoint_state(model, optimizer, scaler, args, dist_info, steps_per_epoch=steps, **position)

    metrics = MetricsWriter(output_dir, enabled=dist_info.is_main)
    ctx = StepContext(epochs=args.epochs, steps_per_epoch=steps, base_lr=args.lr, cos=args.cos,
                      schedule=args.schedule, warmup_epochs=args.warmup_epochs, amp=args.amp,
                      print_freq=args.print_freq, global_batch=args.batch_size, dist=dist_info,
                      stop=stop or StopRequest(announce=dist_info.is_main), acc=Accumulation(args.accum_iter, streams),
                      min_lr=args.min_lr, wd=args.wd, wd_end=args.weight_decay_end,
                      scalars=lambda values, step: metrics.scalars(values, step, "pretrain_step/"))
    try:
        # The key/target network has requires_grad=False, so DDP ignores it: no unused parameters.
        return fit(wrap_ddp(model, dist_info, sync_buffers=False), optimizer, scaler, pipeline, ctx,
                   Checkpointer(output_dir, dist_info, state, streams=streams), metrics, start_epoch=start["epoch"],
                   start_step=start["step"], meter_state=start["meters"], monitor=monitor, knn_every=args.knn_every,
                   save_freq=args.save_freq, save_every_steps=args.save_every_steps,
                   save_every_epochs=args.save_every_epochs)
    finally:
        metrics.close()


def main(args: argparse.Namespace, stop: StopRequest | None = None) -> int:
    """Set up this process (and its process group), train, and return the exit status. A launcher passes its
    own `stop` to learn which signal ended the run (tools/submitit_pretrain.py requeues on submitit's)."""
    return run_in_process_group(lambda a, d: train(a, d, stop), args, args.device)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("main_pretrain.py", parents=[get_args_parser()],
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    try:
        args = resolve_config(args)
    except INPUT_ERRORS as e:  # e.g. `fashion-mnist` named without its files installed
        return report(e)
    return launch(main, args)


if __name__ == "__main__":
    sys.exit(cli())
