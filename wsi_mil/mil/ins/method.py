"""INS as a :class:`~wsi_mil.mil.base.MILMethod`: train an instance classifier from slide labels with
prototype-based pseudo labels (PPLG) and instance-level contrastive learning (IWSCL); bags are scored by
the mean or max of instance probabilities, the aggregator chosen on the validation split.

Source: Qu, Luo, Wang, Wang and Song (INS), "Rethinking Multiple Instance Learning for Whole Slide
Image Classification: A Good Instance Classifier is All You Need", IEEE TCSVT 2024 (arXiv 2307.02249),
Sec. III: IWSCL (supervised contrastive loss over queries, keys and a queue, positives by pseudo label)
and PPLG (prototype EMA, soft targets ``conf <- phi conf + (1 - phi) onehot(argmax(s * Y))``, phi 0.95 ->
0.8), built on PiCO (Wang et al., ICLR 2022). Reference code: miccaiif/INS (train_withbag_cam.py,
train_bag_TCGA.py).

Follows the reference code in: SGD (momentum 0.9, lr 0.01 constant, weight decay 1e-3 CAMELYON16 /
1e-5 TCGA), batch 64, queue 8192, prototype momentum 0.9, key EMA 0.999, contrastive weight 0.5,
temperature 0.07; warm-up before ``proto_start`` on positive-slide instances only with uniform targets
[0.5, 0.5] and a MoCo-style contrastive loss, prototypes and queue untouched, plus a classifier-only
pass with the bag label as target (CAMELYON16: both in epoch 0; TCGA: epoch 0 classifier-only, 1-19
warm-up); the candidate set Y from slide labels only.

Deviations (each a setting; the reference value is one setting away):

- ``initial_positive_conf`` / ``pretrain_target`` None (auto, prevalence-aware: the soft target of
  positive-slide instances starts where the classifier's 0.5 boundary falls between the two
  populations); 0.5 / 1.0 = the reference, which collapses to all-negative pseudo labels when tumour is
  rare.
- ``novelty_quantile`` 0.99 (feature variant): the pretrain targets and the initial soft targets of
  positive-bag instances come from what negative bags guarantee (:mod:`wsi_mil.mil.ins.novelty`): an
  instance is positive ([0, 1]) when its distance to its 5th-nearest negative-bag instance exceeds the
  0.99 quantile of that distance among negative-bag instances (against other bags), else negative
  (with fewer than 5 negative training slides there is nothing to calibrate: the slide-label start).
  ``pretrain_target`` / ``initial_positive_conf`` then go unused. Why: at 2% tumour a classifier
  trained on bag labels learns patient offsets (instance->bag-label logistic regression ranks tumour at
  AUC 0.63), PPLG starts from it and never recovers (benchmark: 5 of 9 folds at instance AUC 0.51-0.76
  after 60 epochs); the novelty start ranks training tumour at AUC 0.97-0.98 in every fold. None = the
  reference's slide-label start.
- ``negative_quantile`` 0.99: a positive-bag instance may be pseudo-labelled positive (prototype
  update, SupCon labels, PPLG one-hot) only when its p(positive) exceeds the 0.99 quantile of the
  negative-bag instances' p(positive) noted in the previous epoch; None = argmax (the reference).
- ``checkpoint_from_proto_start`` true: no checkpoint from before pseudo-labelling; patience counts from
  ``proto_start``; ``fit/best_epoch_from_proto_start`` is logged (the reference picked the best epoch on
  the test set).
- Feature variant: an MLP on frozen features with real feature augmentation (dropout, Gaussian noise)
  for the two views (the reference feature scripts used identical views); features standardised.
- Bag score: the mean or the max of instance probabilities, chosen on the validation split (the
  reference reported several aggregators on the test set); no label leak from patch ground truth.
- The reference's attention bag head trained in ``train_bag`` is not built; the classifier-only pass
  trains the instance classifier on bag labels instead.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.base import BagItem, FoldContext, Prediction
from wsi_mil.mil.ins.data import (
    ChunkCache,
    FeatureNormalizer,
    InstanceIndex,
    PatchAugment,
    PatchBag,
    batches,
    chunked_order,
    feature_view,
    gather_features,
    gather_patches,
    instance_chunks,
    normalize_patches,
    open_patch_bag,
    to_chw,
)
from wsi_mil.mil.ins.losses import (
    auto_positive_target,
    bag_targets,
    candidate_labels,
    guarded_pseudo_labels,
    initial_confidence,
    moco_warmup_loss,
    phi_at,
    pplg_update,
    restricted_probs,
    soft_cross_entropy,
    supcon_loss,
)
from wsi_mil.mil.ins.memory import KeyQueue, Prototypes
from wsi_mil.mil.ins.networks import INSNet, cnn_backbone, ema_update, feature_backbone
from wsi_mil.mil.ins.novelty import MIN_NEGATIVE_BAGS, novel_instances
from wsi_mil.mil.metrics import roc_auc
from wsi_mil.mil.schedules import EpochLR

logger = logging.getLogger(__name__)

STATE_FORMAT = "wsi-mil-ins-1"
PREDICT_ROWS = 16384  # instances per forward pass at prediction (feature variant)


def bag_scores(instance_probs: np.ndarray) -> dict[str, float]:
    """Bag-level scores from instance p(positive): mean and max (0 for an empty bag)."""
    if instance_probs.size == 0:
        return {"mean": 0.0, "max": 0.0}
    return {"mean": float(instance_probs.mean()), "max": float(instance_probs.max())}


class INSMethod:
    """Prototype-contrastive instance classifier (binary tasks: class index 1 is the positive class).

    ``cfg.model.ins.variant`` = ``features`` trains an MLP on the frozen features of the bags;
    ``patches`` trains a CNN end to end on RGB patches read from each bag's patch store (found through
    ``ctx.extras.bag_paths`` and the bag's ``patch_store`` attribute).
    """

    def __init__(self, cfg: Config, ctx: FoldContext) -> None:
        if ctx.n_classes != 2:
            raise WsiMilError(
                f"INS supports binary tasks; this task has {ctx.n_classes} classes. Choose another model "
                "(e.g. model.name=abmil) or relabel to two classes (class index 1 = positive)."
            )
        self.cfg = cfg
        self.ins = cfg.model.ins
        self.ctx = ctx
        self.device = torch.device(ctx.device)
        self.variant = self.ins.variant
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.seed) * 1000 + int(ctx.fold))
            if self.variant == "features":
                backbone, width = feature_backbone(int(ctx.in_dim), self.ins.width), self.ins.width
            else:
                backbone, width = cnn_backbone(self.ins.backbone, self.ins.backbone_weights)
            self.enc_q = INSNet(backbone, width, self.ins.embed_dim).to(self.device)
        self.enc_k = copy.deepcopy(self.enc_q)
        for param in self.enc_k.parameters():
            param.requires_grad_(False)
        self.queue = KeyQueue(self.ins.queue_size, self.ins.embed_dim, 2).to(self.device)
        self.prototypes = Prototypes(2, self.ins.embed_dim).to(self.device)
        self.optimizer = torch.optim.SGD(self.enc_q.parameters(), lr=self.ins.lr, momentum=self.ins.momentum,
                                         weight_decay=self.ins.weight_decay)
        self.lr_schedule = EpochLR(self.optimizer, self.ins.lr_schedule)
        self.aggregator = "mean" if self.ins.bag_aggregator == "auto" else self.ins.bag_aggregator
        self.val_auc: dict[str, float] = {}
        self.normalizer: FeatureNormalizer | None = None
        self.rng = np.random.default_rng(int(ctx.seed) * 1000 + int(ctx.fold))
        self._cache: dict[str, np.ndarray] = {}
        self._patch_bags: dict[str, PatchBag] = {}
        self._augment: PatchAugment | None = None
        self._ready = False
        self.negative_threshold = 0.5  # guard threshold before any negative-bag instance was scored
        self._negative_probs: list[Tensor] = []

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, fold: FoldContext) -> None:
        """Index the training instances, build candidate labels and initial soft targets."""
        self.ctx = fold
        self.train_bags = list(fold.train)
        if not self.train_bags:
            raise WsiMilError("INS: the training split of this fold is empty; check the labels CSV and splits.")
        if self.variant == "features":
            if self.ins.standardize:
                self.normalizer = FeatureNormalizer.fit(self.train_bags, self.device)
            self.index = InstanceIndex.from_bags(self.train_bags)
        else:
            self.train_patch_bags = [self._patch_bag(b) for b in self.train_bags]
            self.index = InstanceIndex.from_bags(self.train_bags)
            self.chunk_of = instance_chunks(self.index, self.train_patch_bags)
            size = self.train_patch_bags[0].store.patch_size
            self._augment = PatchAugment(size, self.ins.crop_scale, self.ins.color_jitter)
            self._weak = PatchAugment(size, max(self.ins.crop_scale, 0.8), self.ins.color_jitter / 2)
            self._chunk_cache = ChunkCache(self.ins.shuffle_chunks)
        if len(self.index) < 2:
            raise WsiMilError("INS: the training split has fewer than 2 instances; it cannot be trained.")
        labels = torch.as_tensor(self.index.bag_label, device=self.device)
        self.candidates = candidate_labels(labels)
        auto = auto_positive_target(float((self.candidates[:, 1] > 0).float().mean()))
        self.pretrain_target = self.ins.pretrain_target if self.ins.pretrain_target is not None else auto
        self.positive_init = self.ins.initial_positive_conf if self.ins.initial_positive_conf is not None else auto
        self.conf = initial_confidence(self.candidates, self.positive_init)
        self.bag_targets = bag_targets(self.candidates, self.pretrain_target)
        self.novel: Tensor | None = None
        if self.ins.novelty_quantile is not None and self.variant == "patches":
            logger.info("INS: novelty_quantile needs features; the patches variant starts from the slide labels")
        if self.ins.novelty_quantile is not None and self.variant == "features":
            self.novel = novel_instances(self.train_bags, self.normalizer, self.ins.novelty_quantile, self.rng,
                                         self.device)
            if self.novel is None:
                logger.info("INS fold %d: fewer than %d negative training slides cannot calibrate novelty; starting "
                            "from the slide labels", fold.fold, MIN_NEGATIVE_BAGS)
            else:
                targets = torch.stack([1.0 - self.novel.float(), self.novel.float()], dim=1).to(self.conf.dtype)
                self.conf = targets.clone()
                self.bag_targets = targets.clone()
                logger.info("INS fold %d: %d of %d positive-bag instances novel against negative bags", fold.fold,
                            int(self.novel.sum()), int((self.candidates[:, 1] > 0).sum()))
        self._ready = True
        logger.info("INS fold %d: %d training instances from %d bags (%s variant)", fold.fold, len(self.index),
                    len(self.train_bags), self.variant)

    # --------------------------------------------------------------------------------------- training
    def _views(self, ids: np.ndarray) -> tuple[Tensor, Tensor]:
        """Two independently augmented views (weak for the query, strong for the key) of a batch."""
        if self.variant == "features":
            x = gather_features(self.train_bags, self.index, ids, self.device)
            if self.normalizer is not None:
                x = self.normalizer(x)
            return (feature_view(x, self.ins.feature_dropout, self.ins.feature_noise),
                    feature_view(x, self.ins.feature_dropout, self.ins.feature_noise))
        assert self._augment is not None
        raw = to_chw(gather_patches(self.train_patch_bags, self.index, ids, self._chunk_cache), self.device)
        return self._weak(raw), self._augment(raw)

    def _epoch_order(self, positive_only: bool = False) -> np.ndarray:
        order = self.index.epoch_order(self.rng, self.ins.max_instances_per_epoch, positive_only)
        if self.variant == "patches":
            order = chunked_order(order, self.index, self.chunk_of, self.rng, self.ins.shuffle_chunks)
        return order

    @property
    def first_checkpoint_epoch(self) -> int:
        """First epoch whose state may become the checkpoint (``proto_start`` unless switched off)."""
        return int(self.ins.proto_start) if self.ins.checkpoint_from_proto_start else 0

    def phases(self, epoch: int) -> list[str]:
        """The passes over the training instances that ``epoch`` runs, in order.

        - ``main`` (``epoch >= proto_start``): every instance; PPLG soft targets, SupCon on pseudo
          labels, prototypes and queue updated.
        - ``warmup`` (before ``proto_start``, from ``warmup_contrastive_from``): positive-bag instances only,
          uniform targets [0.5, 0.5], MoCo-style contrastive loss; prototypes and queue are not updated.
        - ``pretrain`` (warm-up epochs ``< pretrain_epochs``, and warm-up epochs before
          ``warmup_contrastive_from``): classifier only, every instance, its bag label as target.
        """
        ins = self.ins
        if epoch >= ins.proto_start:
            return ["main"]
        phases = ["warmup"] if epoch >= ins.warmup_contrastive_from else []
        if epoch < ins.pretrain_epochs or not phases:
            phases.append("pretrain")
        return phases

    def _note_negatives(self, logits: Tensor, candidates: Tensor) -> None:
        """Keep the p(positive) of this batch's negative-bag instances for the next epoch's guard threshold."""
        if self.ins.negative_quantile is None:
            return
        negative = candidates[:, 1] == 0
        if bool(negative.any()):
            self._negative_probs.append(torch.softmax(logits.detach()[negative], dim=1)[:, 1].float().cpu())

    def _update_negative_threshold(self) -> None:
        """Guard threshold = ``negative_quantile`` of the negative-bag p(positive) noted in this epoch."""
        if self._negative_probs:
            seen = torch.cat(self._negative_probs).numpy()  # numpy: torch.quantile caps the input at 2^24 rows
            self.negative_threshold = float(np.quantile(seen, float(self.ins.negative_quantile)))
        self._negative_probs = []

    def _step(self, ids: np.ndarray, phase: str, phi: float) -> tuple[Tensor, Tensor, Tensor]:
        """One SGD step of ``phase`` on the instances ``ids``; returns (loss, classifier loss, contrastive loss)."""
        ins = self.ins
        ids_t = torch.as_tensor(ids, device=self.device)
        x_q, x_k = self._views(ids)
        zero = torch.zeros((), device=self.device)
        if phase == "pretrain":
            logits = self.enc_q.classify(x_q)
            self._note_negatives(logits, self.candidates[ids_t])
            loss_cls = soft_cross_entropy(logits, self.bag_targets[ids_t])
            loss_cont = zero
        else:
            logits, q = self.enc_q(x_q)
            with torch.no_grad():
                ema_update(self.enc_k, self.enc_q, ins.ema)
                _, k = self.enc_k(x_k)
            queue_keys, queue_probs = (t.clone() for t in self.queue.contents())
            if phase == "warmup":
                loss_cont = moco_warmup_loss(q, k, queue_keys, ins.temperature)
                loss_cls = soft_cross_entropy(logits, torch.full_like(logits, 0.5))
            else:
                cand = self.candidates[ids_t]
                probs = restricted_probs(logits.detach(), cand)
                self._note_negatives(logits, cand)
                threshold = self.negative_threshold if ins.negative_quantile is not None else None
                pseudo = guarded_pseudo_labels(probs, cand, threshold)
                allowed = None if threshold is None else pseudo.bool()
                proto_scores = self.prototypes.similarity(q.detach())
                self.prototypes.update(q.detach(), pseudo, ins.proto_momentum)
                self.conf[ids_t] = pplg_update(self.conf[ids_t], proto_scores, cand, phi, allowed)
                pool = torch.cat([q, k, queue_keys], dim=0)
                pool_labels = torch.cat([pseudo, pseudo, queue_probs.argmax(dim=1)], dim=0)
                loss_cont = supcon_loss(q, pool, pseudo, pool_labels, ins.temperature)
                self.queue.enqueue(k, probs)
                loss_cls = soft_cross_entropy(logits, self.conf[ids_t])
        loss = loss_cls + ins.contrastive_weight * loss_cont
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), loss_cls.detach(), loss_cont.detach()

    def train_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        """The passes of :meth:`phases` over (a sample of) the training instances in shuffled cross-bag batches."""
        if not self._ready:
            self.setup(self.ctx)
        self._cache.clear()
        ins = self.ins
        lr = self.lr_schedule.start_epoch(epoch, num_epochs)
        phi = phi_at(epoch, num_epochs, ins.phi_start, ins.phi_end)
        self.enc_q.train()
        self.enc_k.train()
        sums = {"loss": 0.0, "loss_cls": 0.0, "loss_cont": 0.0}
        steps = seen = 0
        phases = self.phases(epoch)
        for phase in phases:
            order = self._epoch_order(positive_only=phase == "warmup")
            seen += int(order.shape[0])
            n_batches = math.ceil(order.shape[0] / ins.batch_size)
            for ids in tqdm(batches(order, ins.batch_size), total=n_batches, desc=f"INS epoch {epoch} {phase}",
                            leave=False, disable=None):
                loss, loss_cls, loss_cont = self._step(ids, phase, phi)
                sums["loss"] += float(loss)
                sums["loss_cls"] += float(loss_cls)
                sums["loss_cont"] += float(loss_cont)
                steps += 1
        self._update_negative_threshold()
        metrics = {key: value / max(1, steps) for key, value in sums.items()}
        positive = self.candidates[:, 1] > 0
        pos_frac = float((self.conf[positive, 1] > 0.5).float().mean()) if bool(positive.any()) else 0.0
        metrics.update({"lr": lr, "phi": phi, "pseudo_positive_fraction": pos_frac, "instances": float(seen),
                        "warmup": float(phases != ["main"]),
                        "epochs_from_proto_start": float(epoch - ins.proto_start)})
        metrics.update(self._choose_aggregator())
        return metrics

    # ------------------------------------------------------------------------------------- validation
    def _choose_aggregator(self) -> dict[str, float]:
        """Validation bag AUC of mean and max pooling; with ``bag_aggregator=auto`` keep the better one."""
        val = list(self.ctx.val)
        if not val:
            return {}
        labels = [int(b.label) for b in val]
        per_bag = [bag_scores(self.instance_probs(b)) for b in val]
        auc_mean = roc_auc(labels, [s["mean"] for s in per_bag])
        auc_max = roc_auc(labels, [s["max"] for s in per_bag])
        self.val_auc = {"mean": auc_mean, "max": auc_max}
        if self.ins.bag_aggregator == "auto" and not math.isnan(auc_mean) and not math.isnan(auc_max):
            self.aggregator = "max" if auc_max > auc_mean else "mean"
        out = {"aggregator_is_max": float(self.aggregator == "max")}
        if not math.isnan(auc_mean):
            out["val_auc_mean_pool"] = auc_mean
        if not math.isnan(auc_max):
            out["val_auc_max_pool"] = auc_max
        return out

    # ------------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def instance_probs(self, bag: BagItem) -> np.ndarray:
        """Instance p(positive) [N] with the query encoder in eval mode (cached until the next epoch)."""
        cached = self._cache.get(bag.slide_id)
        if cached is not None and cached.shape[0] == int(bag.features.shape[0]):
            return cached
        self.enc_q.eval()
        if self.variant == "features":
            out = []
            for start in range(0, int(bag.features.shape[0]), PREDICT_ROWS):
                x = bag.features[start:start + PREDICT_ROWS].to(self.device, torch.float32)
                if self.normalizer is not None:
                    x = self.normalizer(x)
                out.append(torch.softmax(self.enc_q.classify(x), dim=1)[:, 1])
            probs = torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)
        else:
            probs = self._patch_instance_probs(bag)
        self._cache[bag.slide_id] = probs
        return probs

    def _patch_instance_probs(self, bag: BagItem) -> np.ndarray:
        pb = self._patch_bag(bag)
        n = pb.store_rows.shape[0]
        out = np.zeros(n, dtype=np.float32)
        step = max(1, self.ins.batch_size * 4)
        order = np.argsort(pb.store_rows, kind="stable")  # read the store sequentially
        for start in range(0, n, step):
            rows = order[start:start + step]
            x = normalize_patches(to_chw(pb.read(rows), self.device))
            out[rows] = torch.softmax(self.enc_q.classify(x), dim=1)[:, 1].float().cpu().numpy()
        return out

    def predict(self, bag: BagItem) -> Prediction:
        """Bag probabilities [1 - s, s] with s = the chosen aggregate of instance p(positive)."""
        inst = self.instance_probs(bag)
        scores = bag_scores(inst)
        s = scores[self.aggregator]
        extra: dict[str, Any] = dict(scores)
        extra["aggregator"] = self.aggregator
        return Prediction(probs=np.array([1.0 - s, s], dtype=np.float64), instance_scores=inst.astype(np.float32),
                          extra=extra)

    def _patch_bag(self, bag: BagItem) -> PatchBag:
        pb = self._patch_bags.get(bag.slide_id)
        if pb is None:
            paths = self.ctx.extras.bag_paths
            if bag.slide_id not in paths:
                raise WsiMilError(f"INS patches variant: no bag path for slide {bag.slide_id} (ctx.extras.bag_paths);"
                                  " the trainer must pass the HDF5 bag paths.")
            pb = open_patch_bag(bag, Path(paths[bag.slide_id]))
            self._patch_bags[bag.slide_id] = pb
        return pb

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Networks, queue, prototypes, feature normaliser and the chosen aggregator (copies, on CPU)."""

        def cpu(sd: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.detach().cpu().clone() for k, v in sd.items()}

        return {
            "format": STATE_FORMAT,
            "variant": self.variant,
            "enc_q": cpu(self.enc_q.state_dict()),
            "enc_k": cpu(self.enc_k.state_dict()),
            "queue": cpu(self.queue.state_dict()),
            "prototypes": cpu(self.prototypes.state_dict()),
            "aggregator": self.aggregator,
            "val_auc": dict(self.val_auc),
            "norm_mean": None if self.normalizer is None else self.normalizer.mean.detach().cpu().clone(),
            "norm_std": None if self.normalizer is None else self.normalizer.std.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        if state.get("format") != STATE_FORMAT or state.get("variant") != self.variant:
            raise WsiMilError(f"checkpoint is not an INS '{self.variant}' state ({state.get('format')}, "
                              f"{state.get('variant')}); load it with the settings it was trained with.")
        self.enc_q.load_state_dict(state["enc_q"])
        self.enc_k.load_state_dict(state["enc_k"])
        self.queue.load_state_dict(state["queue"])
        self.prototypes.load_state_dict(state["prototypes"])
        self.aggregator = str(state["aggregator"])
        self.val_auc = dict(state.get("val_auc") or {})
        if state.get("norm_mean") is not None:
            self.normalizer = FeatureNormalizer(state["norm_mean"].to(self.device), state["norm_std"].to(self.device))
        else:
            self.normalizer = None
        self._cache.clear()
