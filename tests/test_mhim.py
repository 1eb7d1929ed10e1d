"""MHIM-MIL: masks, schedules, EMA, consistency loss and the teacher-student method on synthetic bags."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from wsi_mil.config import Config, load_config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.base import BagItem, FoldContext, FoldExtras, MILMethod, MILModel
from wsi_mil.mil.mhim import (
    MHIMMethod,
    combine_masks,
    consistency_loss,
    cosine_schedule,
    ema_update,
    high_attention_mask,
    low_attention_mask,
    mask_scores,
    random_mask,
    rank_instances,
    ratio_count,
)
from wsi_mil.mil.models import build_model

IN_DIM = 16
# hand-made attention over 10 instances (sums to 1); ranking high -> low: 5, 1, 3, 7, 8, 9, 2, 6, 4, 0
ATT = torch.tensor([0.01, 0.20, 0.05, 0.15, 0.02, 0.25, 0.03, 0.12, 0.09, 0.08])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- masks
def test_ratio_count_is_ceil_without_round_off() -> None:
    assert ratio_count(100, 0.07) == 7
    assert ratio_count(10, 0.01) == 1
    assert ratio_count(10, 0.0) == 0
    assert ratio_count(10, 1.5) == 10
    assert ratio_count(7, 0.5) == 4


def test_high_mask_deterministic_top_k() -> None:
    assert high_attention_mask(ATT, 0.2, hr=1.0).tolist() == [1, 5]
    assert high_attention_mask(ATT, 0.01, hr=1.0).tolist() == [5]
    assert high_attention_mask(ATT, 0.0, hr=1.0).tolist() == []
    assert high_attention_mask(ATT, 0.3, hr=1.0).dtype == torch.long


def test_high_mask_random_subset_of_enlarged_top() -> None:
    pool = {5, 1, 3, 7}  # top ceil(10 * 0.2 / 0.5) = 4
    seen = set()
    for seed in range(30):
        masked = high_attention_mask(ATT, 0.2, hr=0.5, generator=_gen(seed)).tolist()
        assert len(masked) == 2 and len(set(masked)) == 2
        assert set(masked) <= pool
        assert masked == sorted(masked)
        seen.add(tuple(masked))
    assert len(seen) > 2  # it really is random over the pool
    a = high_attention_mask(ATT, 0.2, hr=0.5, generator=_gen(4))
    b = high_attention_mask(ATT, 0.2, hr=0.5, generator=_gen(4))
    assert torch.equal(a, b)


def test_low_mask_takes_least_attended() -> None:
    assert low_attention_mask(ATT, 0.3).tolist() == [0, 4, 6]
    assert low_attention_mask(ATT, 0.0).tolist() == []


def test_random_mask_counts_and_reproducibility() -> None:
    masked = random_mask(10, 0.5, _gen(1))
    assert len(masked) == 5 and len(set(masked.tolist())) == 5
    assert masked.min() >= 0 and masked.max() < 10
    assert torch.equal(masked, random_mask(10, 0.5, _gen(1)))
    assert len(random_mask(10, 0.0, _gen(1))) == 0
    assert len(random_mask(3, 1.0, _gen(1))) == 3


def test_vote_fusion_differs_from_mean_attention() -> None:
    heads = torch.tensor(
        [
            [0.90, 0.04, 0.03, 0.02, 0.01],
            [0.05, 0.50, 0.40, 0.03, 0.02],
            [0.05, 0.45, 0.40, 0.05, 0.05],
        ]
    )
    assert int(heads.mean(0).argmax()) == 0  # mean attention would pick instance 0 ...
    assert rank_instances(heads, 1).tolist() == [1]  # ... but two heads vote for instance 1
    assert high_attention_mask(heads, 0.2, hr=1.0).tolist() == [1]
    # top-2 per head: {0,1}, {1,2}, {1,2} -> votes 1:3, 2:2, 0:1
    assert rank_instances(heads, 2).tolist() == [1, 2]


def test_vote_ties_broken_by_mean_attention() -> None:
    heads = torch.tensor([[0.50, 0.40, 0.10], [0.05, 0.40, 0.55]])  # one vote each for 0 and 2
    assert rank_instances(heads, 1).tolist() == [2]  # mean 0.325 > 0.275
    # low side: bottom-1 per head is 2 and 0 (one vote each); lower mean attention (0.275) is 0
    assert rank_instances(heads, 1, largest=False).tolist() == [0]
    assert low_attention_mask(heads, 0.3).tolist() == [0]


def test_combine_masks_union_and_never_empty() -> None:
    high, rand, low = torch.tensor([1, 5]), torch.tensor([0, 1, 9]), torch.tensor([0, 4, 6])
    assert combine_masks(10, high, rand, low).tolist() == [2, 3, 7, 8]
    assert combine_masks(4).tolist() == [0, 1, 2, 3]
    everything = torch.arange(3)
    assert combine_masks(3, everything).tolist() == [0]
    assert combine_masks(3, everything, scores=torch.tensor([0.5, 0.2, 0.3])).tolist() == [1]


# -------------------------------------------------------------------------- schedules, EMA, loss
def test_cosine_schedule_end_points() -> None:
    assert cosine_schedule(0.01, 0.0, 0, 100) == pytest.approx(0.01)
    assert cosine_schedule(0.01, 0.0, 100, 100) == pytest.approx(0.0, abs=1e-15)
    assert cosine_schedule(0.01, 0.0, 50, 100) == pytest.approx(0.005)
    assert cosine_schedule(0.9999, 1.0, 0, 10) == pytest.approx(0.9999)
    assert cosine_schedule(0.9999, 1.0, 10, 10) == pytest.approx(1.0)
    assert cosine_schedule(0.9999, 1.0, 25, 10) == pytest.approx(1.0)  # clamped after the end
    values = [cosine_schedule(1.0, 0.0, s, 20) for s in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_ema_update_matches_manual() -> None:
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, student, 0.9)
    for name, value in teacher.state_dict().items():
        expected = 0.9 * before[name] + 0.1 * student.state_dict()[name]
        torch.testing.assert_close(value, expected)
    ema_update(teacher, student, 1.0)  # momentum 1 leaves the teacher unchanged
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, student.state_dict()[name])


def test_consistency_loss_matches_manual() -> None:
    torch.manual_seed(0)
    t = torch.randn(8, requires_grad=True)
    s = torch.randn(8, requires_grad=True)
    loss = consistency_loss(t, s, 0.1, 1.0)
    p = [math.exp(v / 0.1) for v in t.tolist()]
    p = [v / sum(p) for v in p]
    log_z = math.log(sum(math.exp(v) for v in s.tolist()))
    manual = -sum(pi * (si - log_z) for pi, si in zip(p, s.tolist(), strict=True))
    assert loss.item() == pytest.approx(manual, rel=1e-5)
    loss.backward()
    assert t.grad is None and s.grad is not None


def test_dsmil_consistency_loss_is_the_mean_of_per_class_row_losses() -> None:
    """DSMIL's bag embedding B [C, E]: one soft-target CE per class row, averaged (reference MHIM-MIL)."""
    torch.manual_seed(0)
    model = build_model("dsmil", IN_DIM, 2, _cfg("dsmil").model)
    x = torch.randn(30, IN_DIM)
    with torch.no_grad():
        t_emb = model(x).embedding.clone() + 0.3 * torch.randn(2, 32)
    s_emb = model(x).embedding
    assert s_emb.shape == (2, 32)
    rows = []
    for c in range(2):
        target = torch.softmax(t_emb[c] / 0.1, dim=0)
        rows.append(-(target * torch.log_softmax(s_emb[c] / 1.0, dim=0)).sum())
    reference = torch.stack(rows).mean()
    loss = consistency_loss(t_emb, s_emb, 0.1, 1.0)
    torch.testing.assert_close(loss, reference)
    # every class row gets a comparable share of the gradient (a flat softmax over C*E starves one row)
    grad = torch.autograd.grad(loss, s_emb)[0]
    norms = grad.norm(dim=1)
    assert float(norms.min() / norms.max()) > 0.3, norms


# ------------------------------------------------------------------------------------------ method
def _bags(
    n_bags: int, seed: int, n_range: tuple[int, int] = (20, 40), hot_range: tuple[int, int] = (2, 5),
    shift: float = 2.5,
) -> list[BagItem]:
    """Negatives: N(0, 1) instances; positives also hold a few instances shifted by ``shift`` on 4 dims."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        label = i % 2
        n = int(rng.integers(*n_range))
        x = rng.normal(size=(n, IN_DIM)).astype(np.float32)
        if label:
            hot = rng.choice(n, size=int(rng.integers(*hot_range)), replace=False)
            x[hot, :4] += shift
        bags.append(BagItem(slide_id=f"s{seed}_{i}", features=torch.from_numpy(x), label=label))
    return bags


def _cfg(student: str = "abmil", **mhim: object) -> Config:
    cfg = Config()
    cfg.model.hidden_dim = 32
    cfg.model.attention_dim = 16
    cfg.model.dropout = 0.0
    cfg.model.mhim.student = student
    cfg.training.lr = 1e-3
    for key, value in mhim.items():
        setattr(cfg.model.mhim, key, value)
    return cfg


def _train_plain(model: MILModel, bags: list[BagItem], epochs: int, lr: float = 1e-3) -> MILModel:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for bag in bags:
            loss = model.bag_loss(model(bag.features), torch.tensor(bag.label))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def _ctx(
    cfg: Config, train: list[BagItem], baseline_epochs: int = 0, val: list[BagItem] | None = None
) -> FoldContext:
    def train_baseline(name: str) -> MILModel:
        torch.manual_seed(123)
        model = build_model(name, IN_DIM, 2, cfg.model)
        return _train_plain(model, train, baseline_epochs)

    return FoldContext(
        fold=0, seed=0, train=train, val=val or [], n_classes=2, in_dim=IN_DIM,
        device=torch.device("cpu"), extras=FoldExtras(train_baseline=train_baseline),
    )


def test_setup_builds_teacher_from_baseline_and_copies_embed() -> None:
    cfg = _cfg()
    ctx = _ctx(cfg, _bags(4, 0))
    method = MHIMMethod(cfg, ctx)
    assert isinstance(method, MILMethod)
    method.setup(ctx)
    assert method.teacher is not None and method.student is not None
    assert not method.teacher.training and all(not p.requires_grad for p in method.teacher.parameters())
    for ps, pt in zip(method.student.embed.parameters(), method.teacher.embed.parameters(), strict=True):
        assert torch.equal(ps, pt)
    assert not torch.equal(method.student.attention_v.weight, method.teacher.attention_v.weight)
    cfg_no_copy = _cfg(copy_embed=False)
    other = MHIMMethod(cfg_no_copy, _ctx(cfg_no_copy, _bags(4, 0)))
    other.setup()
    assert not torch.equal(other.student.embed[0].weight, other.teacher.embed[0].weight)


def test_setup_uses_load_baseline_when_a_run_is_given() -> None:
    cfg = _cfg(baseline_run="abc123")
    calls = []
    baseline = build_model("abmil", IN_DIM, 2, cfg.model)

    def load_baseline(fold: int, seed: int) -> MILModel:
        calls.append((fold, seed))
        return baseline

    ctx = _ctx(cfg, _bags(4, 0))
    ctx.extras = FoldExtras(load_baseline=load_baseline)
    method = MHIMMethod(cfg, ctx)
    method.setup(ctx)
    assert calls == [(0, 0)]
    assert torch.equal(method.teacher.head.weight, baseline.head.weight)


def test_setup_errors_are_clear() -> None:
    cfg = _cfg()
    ctx = _ctx(cfg, _bags(4, 0))
    ctx.extras = FoldExtras()
    with pytest.raises(WsiMilError, match="no trainer was provided"):
        MHIMMethod(cfg, ctx).setup(ctx)
    ctx.extras = FoldExtras(train_baseline=lambda name: build_model("transmil", IN_DIM, 2, cfg.model))
    with pytest.raises(WsiMilError, match="baseline is a TransMIL"):
        MHIMMethod(cfg, ctx).setup(ctx)


@pytest.mark.parametrize("student", ["abmil", "transmil", "dsmil"])
def test_masked_instances_never_reach_the_student(student: str) -> None:
    """With hr = 1 and no random/low mask, the student sees exactly x minus the teacher's top-k."""
    cfg = _cfg(student, mask_ratio_high=0.3, high_random_ratio=1.0, mask_ratio_random=0.0, mask_ratio_low=0.0)
    bag = _bags(2, 5, n_range=(23, 24))[1]
    x = bag.features
    ctx = _ctx(cfg, [bag], baseline_epochs=0)
    method = MHIMMethod(cfg, ctx)
    method.setup(ctx)
    with torch.no_grad():
        scores = mask_scores(method.teacher(x))
    k = math.ceil(23 * 0.3)
    masked = set(rank_instances(scores, k).tolist())
    expected_kept = [i for i in range(23) if i not in masked]
    seen: list[torch.Tensor] = []
    hook = method.student.embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    metrics = method.train_epoch(0, 1)
    hook.remove()
    assert len(seen) == 1
    assert torch.equal(seen[0], x[expected_kept])
    for row in masked:  # no masked row appears anywhere in the student's input
        assert not (seen[0] == x[row]).all(dim=1).any()
    assert metrics["kept_fraction"] == pytest.approx(len(expected_kept) / 23)
    assert metrics["mask_ratio_high"] == pytest.approx(0.3)


def test_teacher_gets_no_gradients_and_moves_only_by_ema() -> None:
    cfg = _cfg(momentum=0.9, mask_ratio_random=0.3)
    ctx = _ctx(cfg, _bags(1, 3))
    method = MHIMMethod(cfg, ctx)
    method.setup(ctx)
    before = copy.deepcopy(method.teacher.state_dict())
    method.train_epoch(0, 2)
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    student = method.student.state_dict()
    for name, value in method.teacher.state_dict().items():
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * student[name])


def test_momentum_cosine_schedule_is_logged() -> None:
    cfg = _cfg(momentum=0.99, momentum_schedule="cosine")
    ctx = _ctx(cfg, _bags(4, 1))
    method = MHIMMethod(cfg, ctx)
    method.setup(ctx)
    first = method.train_epoch(0, 2)
    second = method.train_epoch(1, 2)
    assert 0.99 <= first["momentum"] < second["momentum"] <= 1.0
    assert first["mask_ratio_high"] > second["mask_ratio_high"] >= 0.0


def test_inference_uses_all_instances_and_state_round_trip(tmp_path) -> None:
    cfg = _cfg(mask_ratio_random=0.5)
    bags = _bags(4, 2)
    ctx = _ctx(cfg, bags)
    method = MHIMMethod(cfg, ctx)
    method.setup(ctx)
    method.train_epoch(0, 1)
    seen: list[int] = []
    hook = method.student.embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    pred = method.predict(bags[0])
    hook.remove()
    assert seen == [bags[0].features.shape[0]]
    assert pred.probs.shape == (2,) and pred.probs.sum() == pytest.approx(1.0, abs=1e-6)
    assert pred.instance_scores.shape == (bags[0].features.shape[0],)
    path = tmp_path / "mhim.pt"
    torch.save(method.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"student", "teacher", "model_name", "in_dim", "n_classes"}
    restored = MHIMMethod(cfg, _ctx(cfg, []))
    restored.load_state_dict(state)
    again = restored.predict(bags[0])
    np.testing.assert_allclose(again.probs, pred.probs, rtol=1e-6)
    for name, value in restored.teacher.state_dict().items():
        assert torch.equal(value, method.teacher.state_dict()[name])


def test_end_to_end_fold_learns_synthetic_bags() -> None:
    """Baseline trained briefly, then MHIM epochs: the student separates held-out bags."""
    torch.manual_seed(0)
    cfg = _cfg(mask_ratio_high=0.03, high_random_ratio=0.5, mask_ratio_random=0.3, cl_alpha=0.1)
    cfg.training.lr = 2e-3
    train = _bags(16, 10, n_range=(15, 30), hot_range=(4, 8), shift=4.0)
    val = _bags(12, 11, n_range=(15, 30), hot_range=(4, 8), shift=4.0)
    ctx = _ctx(cfg, train, baseline_epochs=3, val=val)
    method = MHIMMethod(cfg, ctx)
    method.setup(ctx)
    history = [method.train_epoch(epoch, 3) for epoch in range(3)]
    for metrics in history:
        assert set(metrics) >= {"loss", "ce", "consistency", "mask_ratio_high", "momentum", "kept_fraction"}
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["kept_fraction"] < 0.75
    assert history[-1]["mask_ratio_high"] < history[0]["mask_ratio_high"]
    probs = [method.predict(bag).probs[1] for bag in val]
    assert roc_auc_score([bag.label for bag in val], probs) >= 0.85


# (file, student, cl_alpha, r_rand, r_low, r_h, hr, momentum schedule) as published by Tang et al.
# (ICCV 2023, official code's configs). This guards the presets against edits; it cannot check the paper.
PRESETS = [
    ("camelyon16_mhim_abmil.yaml", "abmil", 0.1, 0.5, 0.0, 0.01, 0.5, "constant"),
    ("tcga_nsclc_mhim_abmil.yaml", "abmil", 0.5, 0.7, 0.2, 0.02, 1.0, "cosine"),
    ("camelyon16_mhim_transmil.yaml", "transmil", 0.1, 0.0, 0.8, 0.03, 0.5, "cosine"),
    ("tcga_nsclc_mhim_transmil.yaml", "transmil", 0.5, 0.6, 0.2, 0.02, 1.0, "constant"),
]


@pytest.mark.parametrize("preset", PRESETS, ids=[p[0] for p in PRESETS])
def test_presets_keep_the_listed_published_hyperparameters(preset: tuple) -> None:
    name, student, alpha, r_rand, r_low, r_h, hr, schedule = preset
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    m = cfg.model.mhim
    assert cfg.model.name == "mhim" and m.student == student
    assert (m.cl_alpha, m.mask_ratio_random, m.mask_ratio_low, m.mask_ratio_high) == (alpha, r_rand, r_low, r_h)
    assert (m.high_random_ratio, m.momentum_schedule, m.momentum) == (hr, schedule, 0.9999)
    t = cfg.training
    assert (t.optimizer, t.lr, t.weight_decay, t.scheduler, t.epochs) == ("adam", 2e-4, 1e-5, "cosine", 200)
    # the reference never stops before epoch 130 (CAMELYON16) / 70 (TCGA), patience 30 / 20
    assert (t.min_epochs, t.patience) == ((130, 30) if name.startswith("camelyon16") else (70, 20))
    # the in-fold baseline stops like the stand-alone baseline presets
    assert (m.baseline_min_epochs, m.baseline_patience) == (30, 20)
    # r_h and the momentum are scheduled over the iterations of all 200 epochs
    cfg.model.hidden_dim, cfg.model.heads = 32, 8
    ctx = FoldContext(0, 0, [], [], 2, IN_DIM, torch.device("cpu"))
    method = MHIMMethod(cfg, ctx)
    total = t.epochs * 10
    r_h_mid, m_mid = method._ratios(total // 2, total)
    assert r_h_mid == pytest.approx(r_h / 2)
    assert m_mid == pytest.approx(0.9999 if schedule == "constant" else (0.9999 + 1.0) / 2)


def test_single_instance_bags_still_train() -> None:
    """Masks that would remove a 1-instance bag entirely leave its one instance to the student."""
    cfg = _cfg(mask_ratio_high=0.5, mask_ratio_random=0.5, mask_ratio_low=0.5)
    bags = [BagItem(slide_id=f"one{i}", features=torch.randn(1, IN_DIM), label=i % 2) for i in range(2)]
    ctx = _ctx(cfg, bags)
    method = MHIMMethod(cfg, ctx)
    method.setup(ctx)
    metrics = method.train_epoch(0, 1)
    assert metrics["kept_fraction"] == 1.0 and math.isfinite(metrics["loss"])


def test_dsmil_student_scores_with_mean_of_bag_and_max_instance_softmax() -> None:
    cfg = _cfg("dsmil")
    bags = _bags(4, 0)
    method = MHIMMethod(cfg, _ctx(cfg, bags))
    method.setup()
    method.train_epoch(0, 2)
    pred = method.predict(bags[1])
    method.student.eval()
    with torch.no_grad():
        out = method.student(bags[1].features)
    expected = 0.5 * torch.softmax(out.logits, 0) + 0.5 * torch.softmax(out.instance_logits.max(0).values, 0)
    np.testing.assert_allclose(pred.probs, expected.numpy(), rtol=1e-5)
