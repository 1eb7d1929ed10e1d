"""MIL aggregators: shapes, permutation invariance, attention normalisation, gradients, determinism."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.config import ModelConfig
from wsi_mil.errors import ConfigError
from wsi_mil.mil.base import MILModel
from wsi_mil.mil.models import build_model
from wsi_mil.mil.transmil import NystromAttention, iterative_pinv
from wsi_mil.registry import model_names

IN_DIM = 24
CFG = ModelConfig(hidden_dim=32, attention_dim=16, heads=8)
INVARIANT = ["mean", "max", "abmil", "gated_abmil", "dsmil"]
ATTENTION = ["abmil", "gated_abmil", "transmil", "dsmil"]
MODEL_NAMES = model_names("aggregator")


def _model(name: str, n_classes: int = 2, seed: int = 0) -> MILModel:
    torch.manual_seed(seed)
    return build_model(name, IN_DIM, n_classes, CFG)


def _bag(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, IN_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("n", [1, 7, 300])
def test_output_shapes(name: str, n: int) -> None:
    model = _model(name, n_classes=3).eval()
    out = model(_bag(n))
    assert out.logits.shape == (3,)
    expected_embedding = (3, CFG.hidden_dim) if name == "dsmil" else (CFG.hidden_dim,)
    assert out.embedding.shape == expected_embedding
    assert out.instance_scores.shape == (n,)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.instance_scores).all()
    if name in ("dsmil", "mean", "max"):
        assert out.instance_logits is not None and out.instance_logits.shape == (n, 3)
    if name == "transmil":
        assert out.head_scores is not None and out.head_scores.shape == (CFG.heads, n)
    else:
        assert out.head_scores is None


@pytest.mark.parametrize("name", INVARIANT)
def test_permutation_invariance(name: str) -> None:
    model = _model(name).eval()
    x = _bag(50)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(x), model(x[perm])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.instance_scores[perm], b.instance_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_sums_to_one(name: str) -> None:
    model = _model(name).eval()
    with torch.no_grad():
        out = model(_bag(37))
    assert (out.instance_scores >= 0).all()
    torch.testing.assert_close(out.instance_scores.sum(), torch.tensor(1.0))
    if out.head_scores is not None:
        torch.testing.assert_close(out.head_scores.sum(dim=1), torch.ones(CFG.heads))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 13, 129, 301])
def test_transmil_odd_sizes(n: int) -> None:
    model = _model("transmil").eval()
    out = model(_bag(n))
    assert out.head_scores is not None and out.head_scores.shape == (8, n)
    assert torch.isfinite(out.logits).all()


def test_transmil_scores_are_first_layer_cls_attention() -> None:
    """head_scores equal softmax(q_cls k^T / sqrt(d)) of layer 1 over the real instances, per head."""
    model = _model("transmil").eval()
    x = _bag(10)
    with torch.no_grad():
        out = model(x)
        h = model.embed(x)
        tokens = model.layer1.norm(torch.cat([model.cls_token, h, h[:6]]))
        q, k, _ = model.layer1.attn.to_qkv(tokens).chunk(3, dim=-1)
        d = CFG.hidden_dim // CFG.heads
        for head in range(CFG.heads):
            qh, kh = q[0, head * d : (head + 1) * d], k[1:11, head * d : (head + 1) * d]
            expected = torch.softmax(kh @ qh / d**0.5, dim=0)
            torch.testing.assert_close(out.head_scores[head], expected)


def test_nystrom_matches_exact_attention_for_short_sequences() -> None:
    """With one landmark per token the Nystrom product reproduces softmax attention."""
    torch.manual_seed(0)
    attn = NystromAttention(16, heads=2, landmarks=64, pinv_iterations=30, dropout=0.0).eval()
    torch.nn.init.zeros_(attn.residual.weight)
    x = torch.randn(20, 16) * 0.3
    with torch.no_grad():
        out, _ = attn(x)
        q, k, v = (attn.split_heads(t) for t in attn.to_qkv(x).chunk(3, dim=-1))
        exact = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1) @ v
        expected = attn.to_out(exact.transpose(0, 1).reshape(20, 16))
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_iterative_pinv_inverts_a_softmax_matrix() -> None:
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(2, 6, 6) * 0.5, dim=-1).double()
    z = iterative_pinv(a, iterations=20)
    torch.testing.assert_close(a @ z, torch.eye(6, dtype=torch.float64).expand(2, 6, 6), atol=1e-6, rtol=0)


def test_nystrom_long_sequence_ignores_padding_keys() -> None:
    """A long sequence (padded to a landmark multiple) gives finite output of the right length."""
    torch.manual_seed(0)
    attn = NystromAttention(16, heads=2, landmarks=8, dropout=0.0).eval()
    x = torch.randn(53, 16)
    out, cls = attn(x, cls_span=(1, 40))
    assert out.shape == (53, 16) and torch.isfinite(out).all()
    q, k, _ = (attn.split_heads(t) for t in attn.to_qkv(x).chunk(3, dim=-1))
    expected = torch.softmax((k[:, 1:41] @ q[:, 0].unsqueeze(-1)).squeeze(-1) * attn.scale, dim=-1)
    torch.testing.assert_close(cls, expected)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_flow(name: str) -> None:
    model = _model(name).train()
    out = model(_bag(40))
    model.bag_loss(out, torch.tensor(1)).backward()
    assert model.embed[0].weight.grad is not None and model.embed[0].weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0 if hasattr(model, "head") else True
    with_grad = [p for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) >= 4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_mode_is_deterministic(name: str) -> None:
    model = _model(name).eval()
    x = _bag(30)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.instance_scores, b.instance_scores)


def test_xavier_init_and_seeded_builds_match() -> None:
    a, b = _model("abmil", seed=5), _model("abmil", seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.count_nonzero(a.head.bias) == 0


def test_dsmil_loss_is_half_bag_half_max_instance() -> None:
    model = _model("dsmil").eval()
    out = model(_bag(12))
    target = torch.tensor(1)
    bag = torch.nn.functional.cross_entropy(out.logits[None], target[None])
    inst = torch.nn.functional.cross_entropy(out.instance_logits.max(0).values[None], target[None])
    torch.testing.assert_close(model.bag_loss(out, target), 0.5 * bag + 0.5 * inst)


def test_max_pool_takes_the_most_positive_instance() -> None:
    model = _model("max").eval()
    x = _bag(9)
    with torch.no_grad():
        out = model(x)
    top = int(out.instance_scores.argmax())
    torch.testing.assert_close(out.logits, model.head(model.embed(x[top])))


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown MIL model 'foo'"):
        build_model("foo", IN_DIM, 2, CFG)


def test_nystrom_uses_at_most_the_landmark_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long sequences (with or without the cls-attention read-out) invert an m x m matrix, m <= landmarks."""
    import wsi_mil.mil.transmil as transmil

    shapes: list[tuple[int, ...]] = []
    real = transmil.iterative_pinv
    monkeypatch.setattr(transmil, "iterative_pinv", lambda a, it=6: shapes.append(tuple(a.shape)) or real(a, it))
    attn = NystromAttention(16, heads=2, landmarks=8, dropout=0.0).eval()
    with torch.no_grad():
        attn(torch.randn(53, 16))
        attn(torch.randn(53, 16), cls_span=(1, 40))
        attn(torch.randn(5, 16))
    assert shapes == [(2, 8, 8), (2, 8, 8), (2, 5, 5)]  # 53 tokens -> 8 segments of 7 (3 padded)


def test_dsmil_score_is_mean_of_bag_and_max_instance_softmax() -> None:
    model = _model("dsmil").eval()
    out = model(_bag(15))
    bag = torch.softmax(out.logits, dim=0)
    inst = torch.softmax(out.instance_logits.max(0).values, dim=0)
    expected = 0.5 * bag + 0.5 * inst
    torch.testing.assert_close(model.bag_probs(out), expected)
    assert not torch.allclose(expected, bag)  # the instance stream changes the score
    # the score the trainer uses (validation AUC, threshold, test metrics) is this one
    from wsi_mil.mil.base import BagItem
    from wsi_mil.mil.methods import predict_with

    x = _bag(15)
    pred = predict_with(model, BagItem("s", x, 1))
    out = model(x)
    torch.testing.assert_close(torch.as_tensor(pred.probs), model.bag_probs(out))


def test_abmil_attention_has_no_bias_as_in_the_mhim_reference() -> None:
    model = _model("abmil")
    assert model.attention_v.bias is None and model.attention_w.bias is None
