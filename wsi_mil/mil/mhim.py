"""MHIM-MIL: masked hard instance mining with a momentum teacher.

Source: Tang, Huang, Zhang, Zhou, Zhang and Liu, "Multiple Instance Learning Framework with Masked Hard
Instance Mining for Whole Slide Image Classification", ICCV 2023 (arXiv 2307.15254), Sec. 3: attention-
based masking of the teacher's most-attended instances (high-attention, random and low-attention masks,
Sec. 3.2), the soft-target consistency loss between teacher and student bag embeddings plus the bag
cross-entropy (Sec. 3.3), and the EMA teacher update (Sec. 3.3). Reference code: DearCaat/MHIM-MIL,
branch v1; its behaviour is written up in docs/MHIM-MIL.md of the shared notes and in docs/methods.md.

A teacher (EMA of the student, initialised from a trained baseline of the same fold) scores every
instance of a bag; the most-attended instances (plus random and low-attention ones) are removed from
the student's input, and a soft-target cross-entropy ties the student's bag embedding to the teacher's.
Only the student predicts.

Follows the reference code in: mask construction (``ceil`` counts, the ``hr`` enlarged top-k, vote
fusion over TransMIL heads), r_h cosine-decayed to 0 and the momentum (constant or cosine to 1) per
iteration over all ``training.epochs`` (200 in the presets), temperatures 0.1 / 1.0, the per-class-row
consistency loss for DSMIL's [C, E] bag embedding, DSMIL's bag + max-instance loss and score, the
student copying only the baseline's ``embed``, Adam with a per-epoch cosine learning rate
(``torch.optim.lr_scheduler.CosineAnnealingLR``), and early stopping never before epoch 130
(CAMELYON16) / 70 (TCGA) in the presets.

Deviations from the reference code (each a setting; the reference value is one setting away):

- ``model.mhim.teacher_eval`` = true: the teacher runs in eval mode (dropout off), as the paper's
  pseudocode implies; the reference code leaves its dropout on (``teacher_eval=false``).
- A validation split carved from each training fold drives early stopping, checkpoint and threshold
  choice (the reference used the test fold on CAMELYON16); not a switch, by design.
- The in-fold baseline stops like the stand-alone baseline presets (``model.mhim.baseline_min_epochs``
  30, ``baseline_patience`` 20; None = the MHIM run's own ``training.min_epochs``/``patience``).
- TransMIL masks by the exact cls attention of its first layer (:mod:`wsi_mil.mil.transmil`), not by
  the Nystrom approximation the reference reads; ``benchmarks/nystrom_topk.py`` measures the
  difference.

The pure pieces (masks, schedules, EMA, consistency loss) are module functions so they can be tested
on hand-made inputs; :class:`MHIMMethod` drives them for one fold through the ``MILMethod`` protocol.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.base import BagItem, FoldContext, MILModel, MILOutput, Prediction
from wsi_mil.mil.models import build_model
from wsi_mil.mil.schedules import EpochLR

log = logging.getLogger(__name__)

_EMPTY = torch.empty(0, dtype=torch.long)


# ------------------------------------------------------------------------------------------- masks
def ratio_count(n: int, ratio: float) -> int:
    """``ceil(n * ratio)`` clipped to [0, n], robust to float round-off (0.07 * 100 -> 7, not 8)."""
    if ratio <= 0 or n <= 0:
        return 0
    return min(n, math.ceil(n * ratio - 1e-9))


def rank_instances(scores: Tensor, k: int, largest: bool = True) -> Tensor:
    """Indices of the ``k`` highest (or lowest) scored instances, best first.

    ``scores`` [N]: a plain top-k. ``scores`` [H, N] (multi-head attention): each head votes for its
    own top-k; instances are ranked by vote count, ties broken by mean attention over heads (higher
    first for ``largest``, lower first otherwise), then by index.
    """
    n = scores.shape[-1]
    k = max(0, min(k, n))
    if k == 0:
        return _EMPTY.to(scores.device)
    signed = scores if largest else -scores
    if signed.dim() == 1:
        return torch.sort(signed, descending=True, stable=True).indices[:k]
    if signed.dim() != 2:
        raise ValueError(f"attention scores must be [N] or [H, N], got shape {tuple(scores.shape)}")
    votes = torch.bincount(signed.topk(k, dim=1).indices.reshape(-1), minlength=n)
    by_mean = torch.sort(signed.mean(dim=0), descending=True, stable=True).indices
    order = torch.sort(votes[by_mean], descending=True, stable=True).indices
    return by_mean[order][:k]


def high_attention_mask(
    scores: Tensor, ratio: float, hr: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Indices to mask among the most-attended instances.

    Take the top ``ceil(N * ratio / hr)`` instances by attention (vote fusion for [H, N]) and mask a
    random ``ceil(N * ratio)`` of them (``hr`` = 1: the deterministic top ``ceil(N * ratio)``).
    Random choices use ``generator`` (CPU). Returns a sorted LongTensor on the CPU.
    """
    if not 0 < hr <= 1:
        raise ValueError(f"hr must be in (0, 1], got {hr}")
    n = scores.shape[-1]
    n_mask = ratio_count(n, ratio)
    if n_mask == 0:
        return _EMPTY.clone()
    pool = rank_instances(scores.detach().float().cpu(), ratio_count(n, ratio / hr))
    if len(pool) > n_mask:
        pool = pool[torch.randperm(len(pool), generator=generator)[:n_mask]]
    return torch.sort(pool).values


def random_mask(n: int, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """``ceil(n * ratio)`` uniformly random instance indices (sorted, CPU)."""
    return torch.sort(torch.randperm(n, generator=generator)[: ratio_count(n, ratio)]).values


def low_attention_mask(scores: Tensor, ratio: float) -> Tensor:
    """The ``ceil(N * ratio)`` least-attended instances (vote fusion over heads for [H, N]), sorted, CPU."""
    k = ratio_count(scores.shape[-1], ratio)
    return torch.sort(rank_instances(scores.detach().float().cpu(), k, largest=False)).values


def combine_masks(n: int, *masks: Tensor, scores: Tensor | None = None) -> Tensor:
    """Kept instance indices (sorted, CPU) after removing the union of ``masks``; never empty.

    If the union covers every instance, the least-attended one (by ``scores``, mean over heads for
    [H, N]; index 0 without scores) is kept so the student still sees a bag.
    """
    masked = torch.zeros(n, dtype=torch.bool)
    for mask in masks:
        masked[mask.cpu()] = True
    kept = torch.nonzero(~masked).view(-1)
    if len(kept) == 0 and n > 0:
        if scores is None:
            return torch.zeros(1, dtype=torch.long)
        flat = scores.detach().float().cpu()
        flat = flat.mean(dim=0) if flat.dim() == 2 else flat
        return flat.argmin().view(1)
    return kept


# ------------------------------------------------------------------------------- schedules and EMA
def cosine_schedule(start: float, end: float, step: int, total: int) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step >= total)."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` for every parameter; buffers are copied."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student must have the same architecture for the EMA update")
    torch._foreach_lerp_(t_params, s_params, 1.0 - m)  # t + (1 - m)(s - t), one pass over the weights
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        tb.copy_(sb)


def consistency_loss(
    teacher_emb: Tensor, student_emb: Tensor, t_teacher: float = 0.1, t_student: float = 1.0
) -> Tensor:
    """Soft-target cross-entropy between the teacher's and the student's bag embeddings.

    Tang et al., ICCV 2023, Eq. 6: ``H(softmax(t / Tt), log_softmax(s / Ts))`` over the embedding width.
    A 1-D embedding [E] is one distribution; a 2-D embedding [C, E] (DSMIL's per-class bag embedding B)
    is one distribution per class row, and the loss is the mean over the rows, as the reference code
    (MHIM-MIL v1, ``SoftTargetCrossEntropy`` on B [C, E] with the mean over rows) runs it. A softmax over
    all C*E values instead lets one row take nearly all of the probability mass and the gradient.

    Parameters
    ----------
    teacher_emb, student_emb : Tensor
        Bag embeddings of the same shape, float [E] or [C, E]. The teacher side is detached.
    t_teacher, t_student : float
        Softmax temperatures of the teacher and the student.

    Returns
    -------
    Tensor
        Scalar loss (float32).
    """
    if teacher_emb.shape != student_emb.shape:
        raise ValueError(f"teacher and student embeddings differ in shape: {tuple(teacher_emb.shape)} vs "
                         f"{tuple(student_emb.shape)}")
    width = teacher_emb.shape[-1]
    target = torch.softmax(teacher_emb.detach().reshape(-1, width).float() / t_teacher, dim=1)
    log_prob = torch.log_softmax(student_emb.reshape(-1, width).float() / t_student, dim=1)
    return -(target * log_prob).sum(dim=1).mean()


def mask_scores(out: MILOutput) -> Tensor:
    """The attention MHIM masks by: per-head [H, N] when present, DSMIL's max-class instance logits, else [N]."""
    if out.head_scores is not None:
        return out.head_scores
    if out.instance_logits is not None and out.embedding.dim() == 2:
        return out.instance_logits.max(dim=1).values
    return out.instance_scores


# ------------------------------------------------------------------------------------------ method
class MHIMMethod:
    """The MHIM-MIL training method for one fold (implements ``MILMethod``).

    ``ctx.extras`` must provide ``load_baseline(fold, seed) -> MILModel`` when
    ``cfg.model.mhim.baseline_run`` is set, else ``train_baseline(student_name) -> MILModel``.
    Epochs passed to :meth:`train_epoch` count from 0.
    """

    def __init__(self, cfg: Config, ctx: FoldContext) -> None:
        self.cfg = cfg
        self.mcfg = cfg.model.mhim
        self.ctx = ctx
        self.student_name = self.mcfg.student
        self.student: MILModel | None = None
        self.teacher: MILModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_schedule: EpochLR | None = None
        self.iteration = 0

    # ---------------------------------------------------------------------------------- building
    def _new_model(self) -> MILModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.ctx.seed * 1000 + self.ctx.fold)
            model = build_model(self.student_name, self.ctx.in_dim, self.ctx.n_classes, self.cfg.model)
        return model.to(self.ctx.device)

    def _get_baseline(self) -> MILModel:
        extras = self.ctx.extras
        if self.mcfg.baseline_run:
            loader = extras.load_baseline
            if loader is None:
                raise WsiMilError(
                    f"model.mhim.baseline_run={self.mcfg.baseline_run} is set but no baseline loader was "
                    "provided; run MHIM through `wsi-mil train`, or unset model.mhim.baseline_run."
                )
            return loader(self.ctx.fold, self.ctx.seed)
        trainer = extras.train_baseline
        if trainer is None:
            raise WsiMilError(
                "MHIM needs a trained baseline per fold but no trainer was provided; run it through "
                "`wsi-mil train --model mhim` or set model.mhim.baseline_run to a baseline run id."
            )
        return trainer(self.student_name)

    def setup(self, fold: FoldContext | None = None) -> None:
        """Get the fold's baseline; teacher = copy of it, student = fresh model with its ``embed``."""
        if fold is not None:
            self.ctx = fold
        baseline = self._get_baseline()
        reference = self._new_model()
        if type(baseline) is not type(reference):
            raise WsiMilError(
                f"the MHIM baseline is a {type(baseline).__name__} but model.mhim.student is "
                f"'{self.student_name}'; use a baseline run trained with --model {self.student_name}."
            )
        self.teacher = copy.deepcopy(baseline).to(self.ctx.device)
        self.teacher.requires_grad_(False)
        self.teacher.train(not self.mcfg.teacher_eval)
        self.student = reference
        if self.mcfg.copy_embed:
            self.student.embed.load_state_dict(baseline.embed.state_dict())
        self.optimizer = self._make_optimizer(self.student)
        self.iteration = 0

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        tcfg = self.cfg.training
        opt_cls = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.lr_schedule = EpochLR(optimizer, tcfg.scheduler)
        return optimizer

    # ---------------------------------------------------------------------------------- training
    def _ratios(self, step: int, total: int) -> tuple[float, float]:
        """(r_h, momentum) at iteration ``step`` of ``total``."""
        r_h = cosine_schedule(self.mcfg.mask_ratio_high, 0.0, step, total)
        if self.mcfg.momentum_schedule == "cosine":
            momentum = cosine_schedule(self.mcfg.momentum, 1.0, step, total)
        else:
            momentum = self.mcfg.momentum
        return r_h, momentum

    def select_kept(self, scores: Tensor, r_h: float, generator: torch.Generator) -> Tensor:
        """Kept instance indices (CPU) for one bag given the teacher's attention and the current r_h."""
        n = scores.shape[-1]
        high = high_attention_mask(scores, r_h, self.mcfg.high_random_ratio, generator)
        rand = random_mask(n, self.mcfg.mask_ratio_random, generator)
        low = low_attention_mask(scores, self.mcfg.mask_ratio_low)
        return combine_masks(n, high, rand, low, scores=scores)

    def train_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        """One pass over ``ctx.train`` in a seeded shuffled order; returns the epoch's mean metrics."""
        if self.student is None or self.teacher is None or self.optimizer is None:
            raise RuntimeError("MHIMMethod.setup() must run before train_epoch()")
        student, teacher, mcfg = self.student, self.teacher, self.mcfg
        assert self.lr_schedule is not None
        lr = self.lr_schedule.start_epoch(epoch, num_epochs)
        student.train()
        teacher.train(not mcfg.teacher_eval)
        bags = self.ctx.train
        n_bags = len(bags)
        total = max(1, num_epochs * n_bags)
        generator = torch.Generator().manual_seed(self.ctx.seed * 100_003 + epoch)
        order = torch.randperm(n_bags, generator=generator).tolist()
        sums = torch.zeros(3, device=self.ctx.device)
        r_h_sum = m_sum = kept_sum = 0.0
        for i, index in enumerate(order):
            bag = bags[index]
            step = epoch * n_bags + i
            r_h, momentum = self._ratios(step, total)
            x = bag.features
            with torch.inference_mode():
                t_out = teacher(x)
                scores = mask_scores(t_out)
                t_emb = t_out.embedding.clone()
            kept = self.select_kept(scores, r_h, generator)
            x_kept = x if len(kept) == x.shape[0] else x[kept.to(x.device)]
            s_out = student.aggregate(student.embed(x_kept))
            target = torch.tensor(bag.label, device=x.device)
            ce = student.bag_loss(s_out, target)
            cons = consistency_loss(t_emb, s_out.embedding, mcfg.teacher_temperature, mcfg.student_temperature)
            loss = ce + mcfg.cl_alpha * cons
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            ema_update(teacher, student, momentum)
            self.iteration = step + 1
            sums += torch.stack([loss.detach(), ce.detach(), cons.detach()]).float()
            r_h_sum += r_h
            m_sum += momentum
            kept_sum += len(kept) / x.shape[0]
        denom = max(1, n_bags)
        loss_v, ce_v, cons_v = (sums / denom).tolist()
        return {
            "loss": loss_v,
            "ce": ce_v,
            "consistency": cons_v,
            "mask_ratio_high": r_h_sum / denom,
            "momentum": m_sum / denom,
            "kept_fraction": kept_sum / denom,
            "lr": lr,
        }

    # --------------------------------------------------------------------------------- inference
    def predict(self, bag: BagItem) -> Prediction:
        """The student alone on ALL instances, eval mode, no gradients."""
        if self.student is None:
            raise RuntimeError("MHIMMethod has no student; call setup() or load_state_dict() first")
        self.student.eval()
        with torch.inference_mode():
            out = self.student(bag.features.to(self.ctx.device))
            probs = self.student.bag_probs(out)
        return Prediction(
            probs=probs.cpu().numpy(),
            instance_scores=out.instance_scores.float().cpu().numpy(),
            extra={"n_instances": int(bag.features.shape[0])},
        )

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Student and teacher weights plus what is needed to rebuild them."""
        if self.student is None or self.teacher is None:
            raise RuntimeError("MHIMMethod has nothing to save before setup()")
        return {
            "method": "mhim",
            "model_name": self.student_name,
            "in_dim": self.ctx.in_dim,
            "n_classes": self.ctx.n_classes,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (builds the models when setup() has not run)."""
        if state.get("method") != "mhim":
            raise WsiMilError("this checkpoint was not written by MHIM-MIL; evaluate it with its own model.")
        self.student_name = state["model_name"]
        self.ctx.in_dim, self.ctx.n_classes = int(state["in_dim"]), int(state["n_classes"])
        self.student = self._new_model()
        self.student.load_state_dict(state["student"])
        self.teacher = self._new_model()
        self.teacher.load_state_dict(state["teacher"])
        self.teacher.requires_grad_(False)
        self.teacher.train(not self.mcfg.teacher_eval)
        self.optimizer = self._make_optimizer(self.student)
        self.iteration = int(state.get("iteration", 0))
