"""Loss functions of the methods."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .distributed import all_gather_with_grad, get_rank


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A block where autocast is off, for the few operations that must stay in float32 under
    --amp: the contrastive logits. bf16 keeps 8 bits of mantissa, so a cosine similarity of
    0.98 divided by T = 0.07 (a logit of 14) is resolved only to about 0.06, which is as large
    as the differences between positive and hard negatives the loss has to see."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 when it is in a half-precision dtype (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pretext_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """How often the positive is the top candidate (acc1) or among the top 5 (acc5), in percent:
    the instance-discrimination accuracy facebookresearch/moco's progress line shows. Scalars on
    the logits' device, without gradient (read them at print steps only)."""
    with torch.no_grad():
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # N x 5
        hit = top == labels.view(-1, 1)
        return {"acc1": hit[:, 0].float().mean() * 100, "acc5": hit.any(dim=1).float().mean() * 100}


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, distributed: bool = False, with_accuracy: bool = False
):
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020).

    z1, z2: N x C, two views of the same N samples (row i of z1 and row i of z2 form a pair).
    With 2N anchors, each anchor's positive is its other view and its negatives are the other
    2N - 2 samples; the loss is the mean over anchors of
    -log(exp(sim(a, pos) / T) / sum_{b != a} exp(sim(a, b) / T)), sim being cosine similarity.

    With `distributed=True` every process contributes its embeddings: the negatives are all
    samples of all processes and gradients flow back through the gather. The value returned is
    the mean over this process's 2N anchors; averaged over processes (as DistributedDataParallel
    does with gradients) it equals the loss of one process over the global batch. At world size
    1 both modes are the same. Computed in float32 whatever autocast says (see full_precision).
    With `with_accuracy`: (loss, pretext_accuracy of the positives among the candidates).
    """
    with full_precision(z1):
        loss, accuracy = _nt_xent(at_least_fp32(z1), at_least_fp32(z2), temperature, distributed)
    return (loss, accuracy) if with_accuracy else loss


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, distributed: bool):
    n = z1.shape[0]
    z1 = F.normalize(z1, dim=1)  # N x C
    z2 = F.normalize(z2, dim=1)
    if distributed:
        z1_all = all_gather_with_grad(z1)  # (W*N) x C
        z2_all = all_gather_with_grad(z2)  # (W*N) x C
        offset = get_rank() * n
    else:
        z1_all, z2_all, offset = z1, z2, 0
    return _nt_xent_anchors(torch.cat([z1, z2], dim=0), z1_all, z2_all, offset, temperature)


def _nt_xent_anchors(anchors: torch.Tensor, z1_all: torch.Tensor, z2_all: torch.Tensor, offset: int,
                     temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NT-Xent's mean over `anchors` (2N x C: rows offset .. offset + N - 1 of z1_all, then the
    same rows of z2_all), against every other row of the global batch; everything L2-normalised.
    Returns the loss and the anchors' pretext accuracy."""
    n = anchors.shape[0] // 2
    total = z1_all.shape[0]  # W*N
    candidates = torch.cat([z1_all, z2_all], dim=0)  # 2WN x C
    logits = anchors @ candidates.T / temperature  # 2N x 2WN

    local = torch.arange(n, device=anchors.device) + offset  # the anchors' rows in z1_all
    self_idx = torch.cat([local, local + total])  # each anchor's own column
    pos_idx = torch.cat([local + total, local])  # each anchor's other view
    rows = torch.arange(2 * n, device=anchors.device)
    logits[rows, self_idx] = float("-inf")  # an anchor is never its own negative
    return F.cross_entropy(logits, pos_idx), pretext_accuracy(logits, pos_idx)


def nt_xent_of(z1_all: torch.Tensor, z2_all: torch.Tensor, offset: int, n: int,
               temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NT-Xent's mean over the 2N anchors of one process (rows offset .. offset + N - 1) of a global
    batch held whole: z1_all, z2_all (W*N) x C, every process's embeddings (not normalised). What
    `nt_xent(..., distributed=True, with_accuracy=True)` computes on that process; float32 whatever
    autocast says."""
    with full_precision(z1_all):
        z1_all = F.normalize(at_least_fp32(z1_all), dim=1)
        z2_all = F.normalize(at_least_fp32(z2_all), dim=1)
        anchors = torch.cat([z1_all[offset:offset + n], z2_all[offset:offset + n]], dim=0)
        return _nt_xent_anchors(anchors, z1_all, z2_all, offset, temperature)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss 2 - 2 cos(p, z) per sample (Grill et al., 2020, Eq. 2).

    p: N x C predictions of the online network; z: N x C projections of the target network
    (detached by the caller). Returns a tensor of N values in [0, 4], computed in float32.
    """
    with full_precision(p):
        return 2 - 2 * F.cosine_similarity(at_least_fp32(p), at_least_fp32(z), dim=-1)


def infonce_against(q: torch.Tensor, keys: torch.Tensor, temperature: float,
                    first: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """moco-v3's contrastive loss: each query against the keys of every process, its positive the
    key of the same image, cross-entropy scaled by 2T.

    q: N x C (this process's queries, with gradient); keys: (world x N) x C, every process's keys
    in rank order, L2-normalised, without gradient; `first`: the row of q's first positive (rank x
    N). Computed in float32 under autocast. Returns the loss and the queries' pretext accuracy.
    """
    with full_precision(q):
        q = F.normalize(at_least_fp32(q), dim=1)
        logits = q @ keys.T / temperature  # N x (world x N)
        labels = torch.arange(q.shape[0], device=q.device) + first
        return F.cross_entropy(logits, labels) * (2 * temperature), pretext_accuracy(logits, labels)
