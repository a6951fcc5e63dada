import math

import pytest
import torch

from nas import losses

# Two tokens, vocabulary of three; the second token is masked out in the masked cases.
S = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0]]])
T = torch.tensor([[[2.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
ALL = torch.tensor([[True, True]])
FIRST = torch.tensor([[True, False]])


def _softmax(row, temperature=1.0):
    e = [math.exp(x / temperature) for x in row]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_forward_kl_equals_hand_computed():
    expected = (_kl(_softmax(T[0, 0].tolist()), _softmax(S[0, 0].tolist()))
                + _kl(_softmax(T[0, 1].tolist()), _softmax(S[0, 1].tolist()))) / 2
    assert float(losses.forward_kl(S, T, ALL)) == pytest.approx(expected, rel=1e-6)
    first = _kl(_softmax(T[0, 0].tolist()), _softmax(S[0, 0].tolist()))
    assert float(losses.forward_kl(S, T, FIRST)) == pytest.approx(first, rel=1e-6)


def test_temperature_scales_by_t_squared():
    t = 2.0
    expected = t**2 * _kl(_softmax(T[0, 0].tolist(), t), _softmax(S[0, 0].tolist(), t))
    assert float(losses.forward_kl(S, T, FIRST, temperature=t)) == pytest.approx(expected, rel=1e-6)


def test_reverse_kl_equals_hand_computed():
    expected = _kl(_softmax(S[0, 0].tolist()), _softmax(T[0, 0].tolist()))
    assert float(losses.reverse_kl(S, T, FIRST)) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_equals_hand_computed():
    labels = torch.tensor([[1, 2]])
    expected = (-math.log(_softmax(S[0, 0].tolist())[1]) - math.log(_softmax(S[0, 1].tolist())[2])) / 2
    assert float(losses.cross_entropy(S, labels, ALL)) == pytest.approx(expected, rel=1e-6)


def test_topk_with_full_vocabulary_equals_forward_kl():
    teacher = torch.log_softmax(T, -1).topk(3, -1)
    value = losses.topk_forward_kl(S, teacher.values, teacher.indices, ALL)
    assert float(value) == pytest.approx(float(losses.forward_kl(S, T, ALL)), rel=1e-5)


def test_topk_folds_the_rest_into_one_bin():
    p, q = _softmax(T[0, 0].tolist()), _softmax(S[0, 0].tolist())
    top = max(range(3), key=lambda i: p[i])
    expected = p[top] * math.log(p[top] / q[top]) + (1 - p[top]) * math.log((1 - p[top]) / (1 - q[top]))
    teacher = torch.log_softmax(T, -1).topk(1, -1)
    assert float(losses.topk_forward_kl(S, teacher.values, teacher.indices, FIRST)) == pytest.approx(expected, rel=1e-5)


def test_cosine_loss_equals_hand_computed():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    assert float(losses.cosine_loss([a], [b], ALL)) == pytest.approx(0.5, abs=1e-6)  # (1 - 0 + 1 - 1) / 2
    projection = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swap: a's first token matches b's
    with torch.no_grad():
        assert float(losses.cosine_loss([a], [b], ALL, projection)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("fn", [losses.forward_kl, losses.reverse_kl])
def test_all_masked_batch_gives_zero_with_a_gradient(fn):
    s = S.clone().requires_grad_()
    value = fn(s, T, torch.zeros(1, 2, dtype=torch.bool))
    value.backward()
    assert float(value) == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
    assert float(losses.cross_entropy(S, torch.tensor([[0, 0]]), torch.zeros(1, 2, dtype=torch.bool))) == 0.0


def _reference(kd: str, hidden, head, mask, tokens, teacher_hidden, teacher_head, topk, ce_weight, t):
    logits = hidden @ head.T
    if kd == "forward" and topk is not None:
        loss = losses.topk_forward_kl(logits, *topk, mask, t)
    elif kd == "forward":
        loss = losses.forward_kl(logits, teacher_hidden @ teacher_head.T, mask, t)
    else:
        loss = losses.reverse_kl(logits, teacher_hidden @ teacher_head.T, mask, t)
    if ce_weight:
        loss = loss + ce_weight * losses.cross_entropy(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    return loss


@pytest.mark.parametrize("kd,cached,ce_weight,t", [("forward", False, 0.0, 1.0), ("reverse", False, 0.0, 2.0),
                                                   ("forward", True, 0.0, 1.0), ("forward", False, 0.5, 1.0),
                                                   ("forward", True, 0.3, 1.5)])
def test_chunked_logit_losses_equal_unchunked_values_and_gradients(kd, cached, ce_weight, t):
    g = torch.Generator().manual_seed(0)
    b, s, d, v, k = 3, 7, 8, 50, 6
    hidden = torch.randn(b, s, d, generator=g, requires_grad=True)
    head = torch.randn(v, d, generator=g, requires_grad=True)
    teacher_hidden, teacher_head = torch.randn(b, s, 12, generator=g), torch.randn(v, 12, generator=g)
    tokens = torch.randint(0, v, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.2
    topk = None
    if cached:
        top = torch.log_softmax(teacher_hidden @ teacher_head.T / t, -1).topk(k, -1)
        topk = (top.values, top.indices.int())
    expected = _reference(kd, hidden, head, mask, tokens, teacher_hidden, teacher_head, topk, ce_weight, t)
    want = torch.autograd.grad(expected, (hidden, head))
    targets = losses.LogitTargets(kd=kd, temperature=t, teacher_hidden=None if cached else teacher_hidden,
                                  teacher_head=None if cached else teacher_head,
                                  topk_logprobs=topk[0] if cached else None, topk_index=topk[1] if cached else None,
                                  labels=tokens.roll(-1, 1), ce_weight=ce_weight)
    for chunk in (1, 5, 1000):  # one token a chunk, chunks across rows, one chunk
        parts = losses.logit_losses(hidden, head, mask, targets, chunk_tokens=chunk)
        got = torch.autograd.grad(parts["loss"], (hidden, head))
        assert float(parts["loss"]) == pytest.approx(float(expected), rel=1e-5)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
        assert ("ce" in parts) == (ce_weight > 0)


def test_chunked_loss_peak_memory_drops_by_the_chunking_factor():
    """Peak resident memory of loss + backward on 2048 tokens of a 32k vocabulary, each in a fresh process."""
    from benchmarks.distill import loss_peak_kib

    factor = 4
    unchunked, chunked = loss_peak_kib(0), loss_peak_kib(2048 // factor)
    assert unchunked > 1_000_000  # the [2048, 32768] fp32 tensors really were there (> 1 GB)
    assert unchunked / chunked >= factor, (unchunked, chunked)


def test_evaluation_under_no_grad_builds_no_head_gradient():
    """Under no_grad (evaluation) no tensor the size of the LM head's fp32 gradient is allocated: for a 256k x 6144
    head that would be 6 GiB per evaluation. The largest allocation is a chunk's logits."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    v, d, chunk = 4096, 256, 16
    hidden = torch.randn(2, 64, d, generator=g, requires_grad=True)
    head = torch.randn(v, d, generator=g, requires_grad=True)  # a trained student's head: it requires grad
    targets = losses.LogitTargets(kd="none", labels=torch.randint(0, v, (2, 64), generator=g), ce_weight=1.0)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        parts = losses.logit_losses(hidden, head, torch.ones(2, 64, dtype=torch.bool), targets, chunk_tokens=chunk)
    assert max(e.cpu_memory_usage for e in prof.events()) <= chunk * v * 4
    assert float(parts["ce"]) > 0
