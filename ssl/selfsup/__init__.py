"""selfsup: MoCo v1/v2, BYOL and SimCLR with exact distributed semantics.

The methods and what they are made of:
    builder      build_model and the public classes (the README's entry point)
    methods/     one module per method behind one protocol (base.Method): moco, byol, simclr
    networks     ResNets, small stem, MLP heads, split BatchNorm, EMA, DDP/compile unwrapping
    losses       NT-Xent over the global batch, BYOL's regression loss, float32 under autocast
Training:
    engine       the pretraining epoch loop (fit) and its steps (train_one_epoch)
    optim        LARS, the one optimizer builder, lr and momentum schedules
    recipes      the papers' recipes (--preset), the demo's, detection's, and their resolver
    resume       the state that continues a run exactly; Checkpointer
    checkpoint   atomic writes, weights_only reads, backbone extraction
    stopping     stop signals and non-finite losses
    distributed  device and backend, every collective, DDP-safe helpers
    cli          usage errors, checks, agreement across ranks, args, DDP wrapping, launchers
Data:
    data         image folders that survive bad files, Fashion-MNIST, the training loader
    presets      the papers' augmentations (one spec for both pipelines), reference transforms
    crops        crop geometry, decode-once worker crops
    augment      the batched colour half (on the device)
    inmemory     small datasets held in memory
    pipeline     how pretraining batches reach the model (the backends)
    sampler      resumable distributed sampling, exact evaluation shards
    rng          seeds from positions, seeded blocks, generator states
Evaluation:
    probe        the frozen backbone under evaluation and its labelled data
    lincls       the linear probe (cached features or images)
    knn          features exactly once per sample, weighted kNN
    monitor      online kNN and the collapse signal
    meters       logging on rank 0, accuracy, metrics.jsonl and TensorBoard
"""

__version__ = "0.1.0"

from .builder import BYOL, MoCo, SimCLR, build_model  # noqa: F401
