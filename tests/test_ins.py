"""INS: queue, prototypes, PPLG targets, contrastive losses, an end-to-end fit, the patches variant."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.base import BagItem, FoldContext, FoldExtras, MILMethod
from wsi_mil.mil.ins import (
    INSMethod,
    KeyQueue,
    Prototypes,
    auto_positive_target,
    candidate_labels,
    infonce_loss,
    initial_confidence,
    phi_at,
    pplg_update,
    restricted_probs,
    supcon_loss,
)
from wsi_mil.mil.metrics import instance_auc
from wsi_mil.stores import commit, create_patch_store, mark_complete, partial_path, write_bag


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors: one thread is faster and kinder to a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- queue
def test_queue_fifo_wraps_and_keeps_class_distributions() -> None:
    q = KeyQueue(size=5, dim=2, n_classes=2)
    keys = torch.arange(14, dtype=torch.float32).view(7, 2)
    probs = torch.stack([torch.linspace(0, 1, 7), 1 - torch.linspace(0, 1, 7)], dim=1)
    q.enqueue(keys[:3], probs[:3])
    k, p = q.contents()
    assert k.shape == (3, 2) and torch.equal(k, keys[:3]) and torch.equal(p, probs[:3])
    q.enqueue(keys[3:7], probs[3:7])  # 7 > 5: the two oldest are overwritten, pointer wraps
    k, p = q.contents()
    assert k.shape == (5, 2) and int(q.ptr) == 2 and int(q.count) == 5
    assert {tuple(r.tolist()) for r in k} == {tuple(r.tolist()) for r in keys[2:7]}
    assert torch.equal(k[0], keys[5]) and torch.equal(k[1], keys[6]) and torch.equal(k[2], keys[2])
    assert torch.equal(p[0], probs[5]) and torch.equal(q.labels(), p.argmax(dim=1))
    big = torch.randn(12, 2)
    q.enqueue(big, torch.rand(12, 2))  # longer than the queue: only the last 5 survive
    assert {tuple(r.tolist()) for r in q.contents()[0]} == {tuple(r.tolist()) for r in big[-5:]}


# -------------------------------------------------------------------------------------- prototypes
def test_prototype_update_matches_sequential_ema_and_is_normalised() -> None:
    torch.manual_seed(0)
    protos = Prototypes(2, 4)
    start = F.normalize(torch.randn(2, 4), dim=1)
    protos.vectors.copy_(start)
    q = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 1, 1, 0, 1, 1])
    protos.update(q, labels, momentum=0.9)
    ref = start.clone()
    for qi, li in zip(q, labels, strict=True):  # the loop of the reference
        ref[li] = 0.9 * ref[li] + 0.1 * qi
    ref = F.normalize(ref, dim=1)
    assert torch.allclose(protos.vectors, ref, atol=1e-6)
    assert torch.allclose(protos.vectors.norm(dim=1), torch.ones(2), atol=1e-6)
    empty = Prototypes(2, 4)
    empty.update(q[:2], torch.tensor([1, 1]), momentum=0.5)
    assert float(empty.vectors[0].norm()) == 0.0 and float(empty.vectors[1].norm()) == pytest.approx(1.0)
    s = protos.similarity(q)
    assert torch.allclose(s, torch.softmax(q @ protos.vectors.t(), dim=1))


# ------------------------------------------------------------------------------------------- PPLG
def test_pplg_keeps_negative_bag_instances_negative_and_moves_positives() -> None:
    y = candidate_labels(torch.tensor([0, 0, 1, 1]))
    assert torch.equal(y, torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    conf = initial_confidence(y)
    assert torch.equal(conf, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]))
    # prototype scores: instance 0 and 2 look positive, 1 and 3 negative
    s = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    new = pplg_update(conf, s, y, phi=0.9)
    assert torch.equal(new[0], torch.tensor([1.0, 0.0]))  # negative bag, even though it looks positive
    assert torch.equal(new[1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(new[2], torch.tensor([0.45, 0.55]))  # 0.9 * 0.5 + 0.1 * [0, 1]
    assert torch.allclose(new[3], torch.tensor([0.55, 0.45]))
    for _ in range(200):
        new = pplg_update(new, s, y, phi=0.9)
    assert torch.allclose(new[2], torch.tensor([0.0, 1.0]), atol=1e-6)
    assert torch.allclose(new.sum(dim=1), torch.ones(4))
    assert torch.equal(initial_confidence(y, 0.75)[2], torch.tensor([0.25, 0.75]))


def test_phi_schedule_end_points() -> None:
    assert phi_at(0, 40, 0.95, 0.8) == pytest.approx(0.95)
    assert phi_at(39, 40, 0.95, 0.8) == pytest.approx(0.8)
    assert phi_at(20, 41, 0.95, 0.8) == pytest.approx(0.875)
    assert phi_at(0, 1, 0.95, 0.8) == pytest.approx(0.95)
    assert auto_positive_target(0.5) == pytest.approx(0.75)
    assert auto_positive_target(0.9) > 0.5 and auto_positive_target(0.9) * 0.9 < 0.5


# ---------------------------------------------------------------------------------------- losses
def test_supcon_matches_loop_reference() -> None:
    torch.manual_seed(1)
    b, t = 4, 0.07
    q = F.normalize(torch.randn(b, 8), dim=1)
    k = F.normalize(torch.randn(b, 8), dim=1)
    queue = F.normalize(torch.randn(5, 8), dim=1)
    pool = torch.cat([q, k, queue])
    lab_q = torch.tensor([0, 1, 0, 0])
    lab_pool = torch.cat([lab_q, lab_q, torch.tensor([1, 1, 0, 1, 0])])
    got = supcon_loss(q, pool, lab_q, lab_pool, t)
    total = 0.0
    for i in range(b):
        others = [j for j in range(pool.shape[0]) if j != i]
        denom = sum(math.exp(float(q[i] @ pool[j]) / t) for j in others)
        positives = [j for j in others if int(lab_pool[j]) == int(lab_q[i])]
        total += -sum(math.log(math.exp(float(q[i] @ pool[j]) / t) / denom) for j in positives) / len(positives)
    assert float(got) == pytest.approx(total / b, rel=1e-4)


def test_infonce_matches_manual() -> None:
    torch.manual_seed(2)
    q = F.normalize(torch.randn(3, 6), dim=1)
    k = F.normalize(torch.randn(3, 6), dim=1)
    queue = F.normalize(torch.randn(4, 6), dim=1)
    got = infonce_loss(q, k, queue, 0.07)
    ref = 0.0
    for i in range(3):
        pos = math.exp(float(q[i] @ k[i]) / 0.07)
        neg = sum(math.exp(float(q[i] @ z) / 0.07) for z in queue)
        ref += -math.log(pos / (pos + neg))
    assert float(got) == pytest.approx(ref / 3, rel=1e-4)
    assert float(infonce_loss(q, k, queue[:0], 0.07)) == pytest.approx(0.0, abs=1e-6)  # empty queue


# ------------------------------------------------------------------------------------ end to end
def synthetic_bags(n_bags: int, n_inst: int, dim: int, witness: float, seed: int) -> tuple[list[BagItem], list[np.ndarray]]:
    """Negatives from 4 tissue clusters; positive bags hold ~witness of tumour instances (a shifted cluster)."""
    world = np.random.default_rng(123)
    centres = world.normal(size=(4, dim))
    shift = world.normal(size=dim)
    shift *= 6.0 / np.linalg.norm(shift)
    rng = np.random.default_rng(seed)
    bags, truth = [], []
    for i in range(n_bags):
        label = i % 2
        x = centres[rng.integers(0, 4, n_inst)] + rng.normal(size=(n_inst, dim))
        y = np.zeros(n_inst, dtype=np.int64)
        if label:
            y[rng.choice(n_inst, max(1, round(witness * n_inst)), replace=False)] = 1
            x[y == 1] += shift
        bags.append(BagItem(f"b{seed}_{i}", torch.tensor(x, dtype=torch.float32), label))
        truth.append(y)
    return bags, truth


def small_config(**ins: object) -> Config:
    settings = {"model.ins.lr": 0.05, "model.ins.batch_size": 32, "model.ins.queue_size": 512, "model.ins.width": 128}
    settings.update({f"model.ins.{k}": v for k, v in ins.items()})
    return Config().with_overrides(settings)


def test_ins_fit_on_synthetic_bags_localises_instances() -> None:
    train, _ = synthetic_bags(20, 64, 32, 0.1, seed=1)
    val, _ = synthetic_bags(8, 64, 32, 0.1, seed=2)
    test, test_truth = synthetic_bags(20, 64, 32, 0.1, seed=3)
    cfg = small_config()
    ctx = FoldContext(0, 0, train, val, 2, 32, torch.device("cpu"), FoldExtras(config=cfg))
    method = INSMethod(cfg, ctx)
    assert isinstance(method, MILMethod)
    method.setup(ctx)
    epochs = 8
    for epoch in range(epochs):
        metrics = method.train_epoch(epoch, epochs)
        assert all(math.isfinite(v) for v in metrics.values())
    assert {"loss", "loss_cls", "loss_cont", "phi", "val_auc_mean_pool", "val_auc_max_pool"} <= set(metrics)
    preds = [method.predict(b) for b in test]
    for p in preds:
        assert p.probs.shape == (2,) and p.probs.sum() == pytest.approx(1.0)
        assert p.instance_scores.shape == (64,) and {"mean", "max", "aggregator"} <= set(p.extra)
        assert p.probs[1] == pytest.approx(p.extra[p.extra["aggregator"]])
    inst = instance_auc([p.instance_scores for p in preds], test_truth)
    bag = roc_auc_score([b.label for b in test], [p.probs[1] for p in preds])
    assert inst > 0.9, inst
    assert bag > 0.9, bag

    state = method.state_dict()
    assert state["aggregator"] in ("mean", "max")
    fresh = INSMethod(cfg, ctx)
    fresh.load_state_dict(state)
    again = fresh.predict(test[0])
    assert np.allclose(again.instance_scores, preds[0].instance_scores, atol=1e-6)
    assert again.extra["aggregator"] == state["aggregator"]


def test_aggregator_fixed_and_multiclass_rejected() -> None:
    train, _ = synthetic_bags(4, 16, 8, 0.25, seed=5)
    cfg = small_config(bag_aggregator="max", queue_size=64)
    ctx = FoldContext(0, 0, train, train[:2], 2, 8, torch.device("cpu"))
    method = INSMethod(cfg, ctx)
    method.setup(ctx)
    method.train_epoch(0, 1)
    pred = method.predict(train[1])
    assert pred.extra["aggregator"] == "max" and pred.probs[1] == pytest.approx(pred.instance_scores.max())
    with pytest.raises(WsiMilError, match="INS supports binary tasks"):
        INSMethod(cfg, FoldContext(0, 0, train, [], 3, 8, torch.device("cpu")))


# ------------------------------------------------------------------------------------ patches
def tiny_store(path: Path, n: int, size: int, seed: int, positive: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 80, size=(n, size, size, 3), dtype=np.uint8)
    if positive:
        patches[: n // 4, :, :, 0] = 220  # a few red "tumour" patches
    coords = np.stack([np.arange(n) * size, np.zeros(n, dtype=np.int64)], axis=1).astype(np.int64)
    tmp = partial_path(path)
    group = create_patch_store(tmp, n_patches=n, patch_size=size, chunk_patches=8,
                               attrs={"patch_size": size, "patch_size_level0": size})
    group["patches"][:] = patches
    group["coords"][:] = coords
    mark_complete(tmp)
    commit(tmp, path)
    return coords


def test_patches_variant_runs_an_epoch(tmp_path: Path) -> None:
    bags, paths = [], {}
    for i in range(4):
        sid = f"p{i}"
        coords = tiny_store(tmp_path / f"{sid}.zarr", 16, 32, seed=i, positive=bool(i % 2))
        feats = np.zeros((16, 4), dtype=np.float32)
        if i == 3:  # a bag whose rows are a shuffled subset of the store: matched by coordinates
            order = np.array([5, 2, 9, 0, 1, 3, 4, 6, 7, 8, 10, 11])
            coords, feats = coords[order], feats[order]
        write_bag(tmp_path / f"{sid}.h5", feats, coords, {"patch_store": str(tmp_path / f"{sid}.zarr")})
        paths[sid] = tmp_path / f"{sid}.h5"
        bags.append(BagItem(sid, torch.tensor(feats), i % 2, coords))
    cfg = small_config(variant="patches", backbone="tiny_cnn", batch_size=8, queue_size=32, shuffle_chunks=2)
    ctx = FoldContext(0, 0, bags[:3], bags[3:], 2, 4, torch.device("cpu"), FoldExtras(bag_paths=paths))
    method = INSMethod(cfg, ctx)
    method.setup(ctx)
    metrics = method.train_epoch(0, 1)
    assert metrics["instances"] == 16 + 48 and math.isfinite(metrics["loss"])  # warm-up (positive bag) + pretrain
    pred = method.predict(bags[3])
    assert pred.instance_scores.shape == (12,) and np.all((pred.instance_scores >= 0) & (pred.instance_scores <= 1))
    # the subset bag's scores follow its own row order: same patch -> same score as in store order
    full_coords = np.stack([np.arange(16) * 32, np.zeros(16, np.int64)], axis=1)
    write_bag(tmp_path / "p3_full.h5", np.zeros((16, 4), np.float32), full_coords,
              {"patch_store": str(tmp_path / "p3.zarr")})
    ctx_full = FoldContext(0, 0, bags[:3], [], 2, 4, torch.device("cpu"),
                           FoldExtras(bag_paths={"p3": tmp_path / "p3_full.h5"}))
    reader = INSMethod(cfg, ctx_full)
    reader.load_state_dict(method.state_dict())
    scores_full = reader.predict(BagItem("p3", torch.zeros(16, 4), 1, None)).instance_scores
    order = [5, 2, 9, 0, 1, 3, 4, 6, 7, 8, 10, 11]
    assert np.allclose(scores_full[order], pred.instance_scores, atol=1e-5)
    with pytest.raises(WsiMilError, match="no bag path"):
        method.predict(BagItem("unknown", torch.zeros(2, 4), 0, None))


# ------------------------------------------------------------------------------ reference schedule
def test_ins_lr_is_constant_by_default_and_cosine_on_request() -> None:
    train, _ = synthetic_bags(4, 16, 8, 0.25, seed=6)
    ctx = FoldContext(0, 0, train, [], 2, 8, torch.device("cpu"))
    assert Config().model.ins.lr_schedule == "constant"
    method = INSMethod(small_config(queue_size=64, proto_start=0), ctx)
    method.setup(ctx)
    lrs = [method.train_epoch(e, 4)["lr"] for e in range(3)]
    assert lrs == [pytest.approx(0.05)] * 3
    cosine = INSMethod(small_config(queue_size=64, proto_start=0, lr_schedule="cosine"), ctx)
    cosine.setup(ctx)
    lrs = [cosine.train_epoch(e, 4)["lr"] for e in range(3)]
    assert lrs == [pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * e / 4))) for e in range(3)]


def test_ins_warmup_uses_positive_bags_and_freezes_prototypes_and_queue() -> None:
    train, _ = synthetic_bags(6, 16, 8, 0.25, seed=7)
    cfg = small_config(queue_size=64, proto_start=2, pretrain_epochs=1, warmup_contrastive_from=1)
    ctx = FoldContext(0, 0, train, [], 2, 8, torch.device("cpu"))
    method = INSMethod(cfg, ctx)
    method.setup(ctx)
    assert method.phases(0) == ["pretrain"] and method.phases(1) == ["warmup"] and method.phases(2) == ["main"]
    n_pos = sum(int(b.features.shape[0]) for b in train if b.label == 1)
    m0 = method.train_epoch(0, 4)  # TCGA reference epoch 0: classifier only, every instance
    assert m0["loss_cont"] == 0.0 and m0["instances"] == sum(int(b.features.shape[0]) for b in train)
    m1 = method.train_epoch(1, 4)  # warm-up: positive-bag instances only, contrastive on
    assert m1["instances"] == n_pos and m1["loss_cont"] > 0
    assert int(method.queue.count) == 0 and float(method.prototypes.vectors.abs().sum()) == 0.0
    method.train_epoch(2, 4)  # pseudo-labelling: prototypes and queue move
    assert int(method.queue.count) > 0 and float(method.prototypes.vectors.abs().sum()) > 0.0
    reference_c16 = INSMethod(small_config(queue_size=64, proto_start=1, pretrain_epochs=1), ctx)
    assert reference_c16.phases(0) == ["warmup", "pretrain"]


def test_fit_never_picks_an_ins_checkpoint_from_before_proto_start() -> None:
    from wsi_mil.mil.fit import fit

    train, _ = synthetic_bags(8, 16, 8, 0.25, seed=8)
    val, _ = synthetic_bags(4, 16, 8, 0.25, seed=9)
    cfg = small_config(queue_size=64, proto_start=3).with_overrides(
        {"training.epochs": 5, "training.min_epochs": 0, "training.patience": 1})
    ctx = FoldContext(0, 0, train, val, 2, 8, torch.device("cpu"))
    method = INSMethod(cfg, ctx)
    method.setup(ctx)
    assert method.first_checkpoint_epoch == 3
    result = fit(method, ctx, cfg.training, progress=False)
    assert result.best_epoch >= 3 and result.first_checkpoint_epoch == 3
    assert result.epochs_run >= 4  # patience counts from proto_start
    off = small_config(queue_size=64, proto_start=3, checkpoint_from_proto_start=False)
    assert INSMethod(off, ctx).first_checkpoint_epoch == 0


@pytest.mark.parametrize(("name", "wd", "proto_start"), [("camelyon16_ins.yaml", 1e-3, 1), ("tcga_nsclc_ins.yaml", 1e-5, 20)])
def test_ins_presets_follow_the_reference_optimisation(name: str, wd: float, proto_start: int) -> None:
    from wsi_mil.config import load_config

    ins = load_config(Path(__file__).resolve().parents[1] / "configs" / name).model.ins
    assert (ins.lr, ins.lr_schedule, ins.momentum, ins.weight_decay) == (0.01, "constant", 0.9, wd)
    assert ins.proto_start == proto_start and ins.checkpoint_from_proto_start
    normal_vs_tumour = name.startswith("camelyon16")  # the novelty start and guard need tumour-free slides
    assert (ins.novelty_quantile, ins.negative_quantile) == ((0.99, 0.99) if normal_vs_tumour else (None, None))
    assert ins.warmup_contrastive_from == (1 if proto_start > 1 else 0)


# ------------------------------------------------------------------------- negative-bag pseudo labels
def test_novel_instances_marks_only_positive_bag_instances_unlike_negative_bags() -> None:
    from wsi_mil.mil.ins import novel_instances

    bags, truth = synthetic_bags(12, 80, 8, 0.05, seed=21)
    novel = novel_instances(bags, None, 0.99, np.random.default_rng(0), torch.device("cpu")).numpy()
    labels = np.concatenate([np.full(80, b.label) for b in bags])
    tumour = np.concatenate(truth).astype(bool)
    assert not novel[labels == 0].any()  # negative bags guarantee negatives
    assert novel[tumour].mean() > 0.9  # shifted instances are far from every negative-bag instance
    assert novel[(labels == 1) & ~tumour].mean() < 0.1  # normal tissue of positive bags is not
    loose = novel_instances(bags, None, 0.5, np.random.default_rng(0), torch.device("cpu")).numpy()
    assert loose[(labels == 1) & ~tumour].mean() > novel[(labels == 1) & ~tumour].mean()  # the quantile is used


def test_ins_novelty_quantile_sets_the_starting_targets_and_none_keeps_the_slide_label() -> None:
    train, truth = synthetic_bags(12, 40, 8, 0.1, seed=22)
    ctx = FoldContext(0, 0, train, [], 2, 8, torch.device("cpu"))
    novelty = INSMethod(small_config(queue_size=64), ctx)
    novelty.setup(ctx)
    assert novelty.ins.novelty_quantile == 0.99
    tumour = torch.as_tensor(np.concatenate(truth).astype(bool))
    positive = novelty.candidates[:, 1] > 0
    assert set(novelty.conf[positive, 1].unique().tolist()) <= {0.0, 1.0}
    assert float(novelty.conf[tumour, 1].mean()) > 0.9 and float(novelty.conf[positive & ~tumour, 1].mean()) < 0.1
    assert torch.equal(novelty.bag_targets, novelty.conf)  # the pretrain pass learns the same targets
    reference = INSMethod(small_config(queue_size=64, novelty_quantile=None), ctx)
    reference.setup(ctx)
    assert torch.all(reference.conf[positive, 1] == reference.positive_init)
    assert torch.all(reference.bag_targets[positive, 1] == reference.pretrain_target)


def test_ins_novelty_needs_enough_negative_slides_and_otherwise_starts_from_the_slide_label() -> None:
    from wsi_mil.mil.ins.novelty import MIN_NEGATIVE_BAGS

    train, _ = synthetic_bags(12, 40, 8, 0.1, seed=22)
    negatives = [b for b in train if b.label == 0]
    few = [b for b in train if b.label == 1] + negatives[:MIN_NEGATIVE_BAGS - 1]
    ctx = FoldContext(0, 0, few, [], 2, 8, torch.device("cpu"))
    method = INSMethod(small_config(queue_size=64), ctx)
    method.setup(ctx)
    positive = method.candidates[:, 1] > 0
    assert method.novel is None and torch.all(method.conf[positive, 1] == method.positive_init)
    enough = [b for b in train if b.label == 1] + negatives[:MIN_NEGATIVE_BAGS]
    ctx = FoldContext(0, 0, enough, [], 2, 8, torch.device("cpu"))
    method = INSMethod(small_config(queue_size=64), ctx)
    method.setup(ctx)
    assert method.novel is not None


def test_guarded_pseudo_labels_need_a_score_above_negative_bags() -> None:
    from wsi_mil.mil.ins import guarded_pseudo_labels

    cand = candidate_labels(torch.tensor([0, 1, 1, 1]))
    probs = restricted_probs(torch.log(torch.tensor([[0.1, 0.9], [0.4, 0.6], [0.8, 0.2], [0.1, 0.9]])), cand)
    assert guarded_pseudo_labels(probs, cand, None).tolist() == [0, 1, 0, 1]  # reference: argmax
    assert guarded_pseudo_labels(probs, cand, 0.7).tolist() == [0, 0, 0, 1]
    s = torch.tensor([[0.1, 0.9]] * 4)  # every prototype score says positive
    conf = initial_confidence(cand)
    guarded = pplg_update(conf, s, cand, 0.5, allowed=torch.tensor([False, False, False, True]))
    assert torch.allclose(guarded[:, 1], torch.tensor([0.0, 0.25, 0.25, 0.75]))
    assert torch.allclose(pplg_update(conf, s, cand, 0.5)[:, 1], torch.tensor([0.0, 0.75, 0.75, 0.75]))


def test_ins_negative_quantile_threshold_comes_from_negative_bags_and_blocks_the_positive_prototype() -> None:
    train, _ = synthetic_bags(8, 32, 8, 0.1, seed=23)
    ctx = FoldContext(0, 0, train, [], 2, 8, torch.device("cpu"))
    method = INSMethod(small_config(queue_size=64, proto_start=1), ctx)
    method.setup(ctx)
    method.train_epoch(0, 3)  # pretrain: notes the negative-bag scores of the epoch
    assert method.negative_threshold != 0.5 and not method._negative_probs
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.05, 0.95]]))
    method._note_negatives(logits, candidate_labels(torch.tensor([0, 0, 1, 1])))
    method._update_negative_threshold()  # only the two negative-bag rows count
    assert method.negative_threshold == pytest.approx(0.1 + 0.99 * (0.3 - 0.1), abs=1e-5)
    method.negative_threshold = 1.0  # nothing can beat it: no instance may become pseudo-positive
    method._step(np.arange(len(method.index)), "main", 0.9)
    assert float(method.prototypes.vectors[1].abs().sum()) == 0.0
    assert float(method.prototypes.vectors[0].abs().sum()) > 0.0
    off = INSMethod(small_config(queue_size=64, proto_start=1, negative_quantile=None), ctx)
    off.setup(ctx)
    off.negative_threshold = 1.0  # ignored without the guard
    off.conf[:] = 0.0
    with torch.no_grad():
        off.enc_q.cls.bias.copy_(torch.tensor([-10.0, 10.0]))  # the classifier calls everything positive
    off._step(np.arange(len(off.index)), "main", 0.9)
    assert float(off.prototypes.vectors[1].abs().sum()) > 0.0
