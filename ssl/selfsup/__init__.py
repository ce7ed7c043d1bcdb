"""selfsup: MoCo v1/v2/v3, BYOL, SimCLR and DINO with exact distributed semantics.

The methods and what they are made of:
    builder      build_model and the public classes (the README's entry point)
    methods/     one module per method, each the whole method (base.Method): moco, mocov3, byol, simclr, dino
    backbones/   the backbone interface and its families (resnet, vit); nothing else reads a network's layers
    networks     MLP heads, split BatchNorm, EMA, DDP/compile unwrapping, compiling the networks
    losses       NT-Xent over the global batch, BYOL's regression loss, float32 under autocast
Configuration and training:
    config       the configuration's layers: common defaults < method < preset or demo < flags
    recipes      the tables gathered from the methods (--preset, linear protocols) and the resolver
    engine       the pretraining epoch loop (fit) and its steps (train_one_epoch)
    optim        LARS, the one optimizer builder (SGD, LARS, AdamW), lr and momentum schedules
    resume       what defines a run, the state that continues it exactly; Checkpointer
    checkpoint   atomic writes, weights_only reads, backbone extraction
    errors       the bad-input errors every entry script reports as one line
    stopping     stop signals and non-finite losses
    distributed  device and backend, every collective, DDP-safe helpers
    cli          checks, agreement across ranks, args, launchers: what each entry script does around its work
Data (the package data/):
    data         image folders that survive bad files, Fashion-MNIST, the training loader
    data.augmentations   the papers' augmentations (one spec per view for every pipeline), reference transforms
    data.crops           crop geometry (bilinear, bicubic), decode-once worker crops of every view
    data.batch_augment   the batched colour half (on the device)
    data.inmemory        small datasets held in memory
    data.pipeline        how pretraining batches reach the model (the backends)
    data.sampler         resumable distributed sampling, exact evaluation shards
    rng          seeds from positions, seeded blocks, generator states
Evaluation:
    probe        the frozen backbone under evaluation and its labelled data
    lincls       the linear probe (cached features or images)
    knn          features exactly once per sample, weighted kNN
    monitor      online kNN and the collapse signal
    meters       logging on rank 0, accuracy, metrics.jsonl and TensorBoard
"""

__version__ = "0.1.0"

from .builder import BYOL, DINO, MoCo, MoCoV3, SimCLR, build_model  # noqa: F401
