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
