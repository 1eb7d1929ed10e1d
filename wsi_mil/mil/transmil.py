"""TransMIL (Shao et al., NeurIPS 2021) with Nystrom self-attention (Xiong et al., AAAI 2021).

Layout: embedded instances -> square-padded token grid (repeating the first tokens) -> cls token ->
TransLayer -> PPEG (depthwise 7/5/3 convs on the 2-D grid) -> TransLayer -> LayerNorm -> cls -> head.

Instance scores: the EXACT cls-row attention of the first layer, ``softmax(q_cls k_i^T / sqrt(d))``
per head, taken from the first layer's own queries/keys (not the Nystrom approximation) and normalised
over the N real instances only (cls itself and the repeated padding tokens are left out). ``head_scores`` [H, N] holds
the per-head rows (each sums to 1), ``instance_scores`` [N] their mean over heads. These are what
MHIM-MIL masks with and what heatmaps draw; they are detached from the graph.

Source: Shao, Bian, Chen, Wang, Zhang, Ji and Zhang, "TransMIL: Transformer based Correlated Multiple
Instance Learning for Whole Slide Image Classification", NeurIPS 2021, Sec. 4 (TPT module, Algorithm 1;
PPEG); Nystrom attention from Xiong et al., "Nystromformer", AAAI 2021 (Eq. 14-15, iterative
pseudo-inverse Eq. 16). Reference codes: szc19990412/TransMIL and the MHIM-MIL v1 TransMIL student.

Deviations: (1) layout: Shao's padding (repeat the first tokens up to a square, cls prepended) is kept
for both the stand-alone model and the MHIM student/teacher; MHIM-MIL v1 lays its student out the same
way but computes the masking attention from the padded Nystrom layer. (2) Masking/heatmap attention is
exact (see above); ``benchmarks/nystrom_topk.py`` measures its top-k overlap with the Nystrom cls row on
real-size bags. (3) Nystrom padding is masked out of the keys (the reference lets zero padding tokens
take part in attention).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from wsi_mil.mil.base import MILModel, MILOutput
from wsi_mil.mil.layers import make_embed, xavier_init


def iterative_pinv(x: Tensor, iterations: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of a batch of square matrices by the iteration of Xiong et al.

    Start from ``Z0 = X^T / (max_i sum_j |x_ij| * max_j sum_i |x_ij|)`` and iterate
    ``Z <- 1/4 Z (13 I - X Z (15 I - X Z (7 I - X Z)))``.
    """
    abs_x = x.abs()
    row_max = abs_x.sum(dim=-1).amax(dim=-1)
    col_max = abs_x.sum(dim=-2).amax(dim=-1)
    z = x.transpose(-1, -2) / (row_max * col_max)[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated with at most ``landmarks`` segment-mean landmarks.

    A sequence of n tokens is cut into ``m = ceil(n / seg)`` segments of ``seg = ceil(n / landmarks)``
    tokens (so m <= landmarks); it is zero-padded at the front by fewer than ``seg`` tokens, padded keys
    are masked out and the first landmark's mean counts real tokens only. Sequences no longer than
    ``landmarks`` use one landmark per token (exact attention up to the pseudo-inverse iterations).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"TransMIL hidden_dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.residual = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def split_heads(self, x: Tensor) -> Tensor:
        """[n, dim] -> [heads, n, head_dim]."""
        return x.view(x.shape[0], self.heads, self.head_dim).transpose(0, 1)

    def forward(self, x: Tensor, cls_span: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
        """x [n, dim] (one sequence) -> ([n, dim], cls attention or None).

        With ``cls_span = (first, count)`` also returns the exact softmax attention of token 0 (cls)
        over tokens ``first:first+count``, per head [H, count], detached (from this layer's own q, k).
        """
        n = x.shape[0]
        seg = math.ceil(n / min(self.landmarks, n))  # tokens per landmark segment
        m = math.ceil(n / seg)  # landmarks actually used (<= self.landmarks)
        pad = m * seg - n  # < seg: only the first segment holds padding
        if pad:
            x = torch.cat([x.new_zeros(pad, x.shape[1]), x], dim=0)
        q, k, v = (self.split_heads(t) for t in self.to_qkv(x).chunk(3, dim=-1))  # [H, L, d]
        q = q * self.scale
        cls_attn = None
        if cls_span is not None:
            first, count = cls_span
            with torch.no_grad():
                keys = k[:, pad + first : pad + first + count]  # [H, count, d]
                cls_attn = torch.softmax((keys @ q[:, pad].unsqueeze(-1)).squeeze(-1), dim=-1)
        if seg == 1:
            q_land, k_land = q, k
        else:
            counts = torch.full((m, 1), float(seg), device=x.device, dtype=x.dtype)
            counts[0] = seg - pad
            q_land = q.reshape(self.heads, m, seg, self.head_dim).sum(dim=2) / counts
            k_land = k.reshape(self.heads, m, seg, self.head_dim).sum(dim=2) / counts
        attn1 = torch.softmax(q @ k_land.transpose(1, 2), dim=-1)  # [H, L, m]
        attn2 = torch.softmax(q_land @ k_land.transpose(1, 2), dim=-1)  # [H, m, m]
        sim3 = q_land @ k.transpose(1, 2)  # [H, m, L]
        if pad:
            sim3[..., :pad] = float("-inf")
        attn3 = torch.softmax(sim3, dim=-1)
        out = (attn1 @ iterative_pinv(attn2, self.pinv_iterations)) @ (attn3 @ v)
        out = out + self.residual(v.unsqueeze(0)).squeeze(0)
        out = out.transpose(0, 1).reshape(x.shape[0], -1)[pad:]
        return self.to_out(out), cls_attn


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom attention block: x + attn(LayerNorm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, landmarks=dim // 2, pinv_iterations=6, dropout=dropout)

    def forward(self, x: Tensor, cls_span: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
        """x [n, dim] -> ([n, dim], cls attention [H, count] over ``cls_span`` or None)."""
        out, cls_attn = self.attn(self.norm(x), cls_span)
        return x + out, cls_attn


class PPEG(nn.Module):
    """Pyramid position encoding: identity + depthwise 7x7, 5x5 and 3x3 convs on the token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, side: int) -> Tensor:
        """x [1 + side*side, dim] (cls first) -> same shape."""
        cls, tokens = x[:1], x[1:]
        grid = tokens.T.reshape(1, x.shape[1], side, side)
        grid = grid + self.conv7(grid) + self.conv5(grid) + self.conv3(grid)
        return torch.cat([cls, grid.reshape(x.shape[1], -1).T], dim=0)


class TransMIL(MILModel):
    """TransMIL for one bag; ``embedding`` is the final normalised cls token [hidden]."""

    def __init__(
        self, in_dim: int, n_classes: int, hidden_dim: int = 512, heads: int = 8, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.embed = make_embed(in_dim, hidden_dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, hidden_dim))
        self.layer1 = TransLayer(hidden_dim, heads)
        self.pos = PPEG(hidden_dim)
        self.layer2 = TransLayer(hidden_dim, heads)
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, n_classes)
        xavier_init(self)

    def aggregate(self, h: Tensor) -> MILOutput:
        """TransMIL's TPT module (Shao et al., NeurIPS 2021, Algorithm 1) on one bag.

        The N tokens are squared up to ``ceil(sqrt(N))**2`` by repeating the first ones, a cls token is
        prepended, then TransLayer (Nystrom attention), PPEG, TransLayer, LayerNorm; logits come from cls.

        h [N, hidden] -> MILOutput:
            ``logits`` [C], ``embedding`` the cls token [hidden], ``head_scores`` [H, N] the first layer's
            exact cls attention per head over the N real instances, ``instance_scores`` [N] their mean.
        """
        n = h.shape[0]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[torch.arange(extra, device=h.device) % n]], dim=0)
        x = torch.cat([self.cls_token.to(h.dtype), h], dim=0)
        x, head_scores = self.layer1(x, cls_span=(1, n))
        assert head_scores is not None
        x = self.pos(x, side)
        x, _ = self.layer2(x)
        cls = self.norm(x)[0]
        return MILOutput(
            logits=self.head(cls),
            embedding=cls,
            instance_scores=head_scores.mean(dim=0),
            head_scores=head_scores,
        )
