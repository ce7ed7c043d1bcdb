"""Losses against naive implementations of the papers' formulas."""

import math

import torch
import torch.nn.functional as F
from selfsup.losses import byol_loss, nt_xent


def naive_nt_xent(z1, z2, t):
    """SimCLR's Eq. 1 with a double loop: mean over the 2N anchors of -log softmax of the positive."""
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        sims = []
        for j in range(n2):
            if j != i:
                cos = (z[i] @ z[j]) / (z[i].norm() * z[j].norm())
                sims.append((j, cos / t))
        denom = sum(torch.exp(s) for _, s in sims)
        num = torch.exp(dict(sims)[pos])
        total = total - torch.log(num / denom)
    return total / n2


def test_nt_xent_matches_naive_loop_including_gradients():
    torch.manual_seed(0)
    z1 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    loss = nt_xent(z1, z2, 0.3)
    loss.backward()
    g1, g2 = z1.grad.clone(), z2.grad.clone()

    a1 = z1.detach().clone().requires_grad_()
    a2 = z2.detach().clone().requires_grad_()
    ref = naive_nt_xent(a1, a2, 0.3)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g1, a1.grad)
    torch.testing.assert_close(g2, a2.grad)


def test_nt_xent_perfect_pairs_reach_the_analytic_value():
    # Orthonormal pairs: positive cosine 1, every negative cosine 0 -> closed form.
    n, t = 4, 0.5
    e = torch.eye(8)[:n]
    loss = nt_xent(e, e.clone(), t)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * n - 2)))
    assert abs(loss.item() - expected) < 1e-6


def test_byol_loss_is_two_minus_two_cos():
    torch.manual_seed(0)
    p, z = torch.randn(6, 5), torch.randn(6, 5)
    expected = torch.stack([2 - 2 * (a @ b) / (a.norm() * b.norm()) for a, b in zip(p, z)])
    torch.testing.assert_close(byol_loss(p, z), expected)
    assert torch.allclose(byol_loss(p, p), torch.zeros(6), atol=1e-6)
    assert torch.allclose(byol_loss(p, -p), torch.full((6,), 4.0), atol=1e-6)


def test_nt_xent_and_byol_loss_are_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 32, generator=g)
    z1 = (base + 0.1 * torch.randn(16, 32, generator=g)).bfloat16()  # pairs close together: large logits
    z2 = (base + 0.1 * torch.randn(16, 32, generator=g)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(z1, z2, 0.1)
        regression = byol_loss(z1, z2)
    assert loss.dtype == torch.float32 and regression.dtype == torch.float32
    torch.testing.assert_close(loss.double(), naive_nt_xent(z1.double(), z2.double(), 0.1), atol=1e-5, rtol=0)
    expected = 2 - 2 * F.cosine_similarity(z1.double(), z2.double(), dim=-1)
    torch.testing.assert_close(regression.double(), expected, atol=1e-6, rtol=0)
