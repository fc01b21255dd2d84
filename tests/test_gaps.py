"""What a backend refuses (:data:`checks.GAPS`): an explicit error of its own, raised before any
kernel runs, where the other backends compute the same call."""

from __future__ import annotations

import numpy as np
import pytest

import fastlsm
from checks import BACKENDS, GAPS, assert_not_numba

X = np.linspace(-2, 2, 24).reshape(2, 3, 4)
T = np.array([[0, 2, 1, 0], [1, 1, 2, 0]])
G = np.cos(np.arange(24.0)).reshape(2, 3, 4)
P = np.exp(X) / np.exp(X).sum(axis=(0, 2), keepdims=True)  # softmax(X, axis=(0, 2))

# What each gap is about: calls that ask for it, given how to move an array to the backend.
CASES = {
    "out": [
        lambda move: fastlsm.log_softmax(move(X), out=move(np.empty_like(X))),
        lambda move: fastlsm.logsumexp(move(X), out=move(np.empty((2, 3)))),
    ],
    "grad_out": [
        lambda move: fastlsm.cross_entropy(move(X), move(T), grad_out=move(np.empty_like(X))),
        lambda move: fastlsm.nll_loss(move(X), move(T), grad_out=move(np.empty_like(X))),
    ],
    "non-adjacent axes": [
        lambda move: fastlsm.log_softmax(move(X), axis=(0, 2)),
        lambda move: fastlsm.softmax_backward(move(G), move(P), axis=(0, 2)),
    ],
    "not C-ordered": [
        lambda move: fastlsm.softmax(move(np.asfortranarray(X))),
        lambda move: fastlsm.log_softmax_backward(move(np.asfortranarray(G)),
                                                  move(np.asfortranarray(X))),
    ],
}
REFUSED = [(b, asks) for b in BACKENDS for asks in CASES if (b.name, asks) in GAPS]
SERVED = [(b, asks) for b in BACKENDS for asks in CASES if (b.name, asks) not in GAPS]


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def test_every_gap_has_cases():
    assert {asks for _, asks in GAPS} <= set(CASES)


@pytest.mark.parametrize("backend, asks", REFUSED, indirect=["backend"],
                         ids=[f"{b.name}-{asks}" for b, asks in REFUSED])
def test_gap_is_an_explicit_error(backend, asks):
    exc, pattern = GAPS[backend.name, asks]
    for case in CASES[asks]:
        with pytest.raises(exc, match=pattern) as ei:
            case(backend.array)
        assert_not_numba(ei)


@pytest.mark.parametrize("backend, asks", SERVED, indirect=["backend"],
                         ids=[f"{b.name}-{asks}" for b, asks in SERVED])
def test_other_backends_compute_it(backend, asks, monkeypatch):
    monkeypatch.undo()  # these run kernels
    for case in CASES[asks]:
        got, expected = backend.result(case(backend.array)), case(np.asarray)
        for g, e in zip(as_tuple(got), as_tuple(expected), strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
