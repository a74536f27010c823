"""The linear-chain CRF against brute force: every label sequence of short sessions enumerated.

Two implementations are checked: the torch ``LookaheadCRF`` (the CRF output layer of the
networks and the layer that serves ``model.arch: crf``; offline ``forward`` and streamed
``ChainBank.step``) and the numpy ``crf_lag_marginals`` (the CRFsuite baseline's decoding). Both
compute label marginals with bounded lookahead, p(y_t | events 0 .. t + lag): lag 0 is
forward filtering (the label on arrival), lag L fixed-lag smoothing (the final label), no
lag the usual forward-backward marginals. Neither exposes a log-partition, a sequence score
or a Viterbi path (the tagger serves marginals, trained by cross-entropy on them), so those
are not tested here; the enumeration's own partition function is what normalises the
reference marginals.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.baseline import crf_lag_marginals
from trainer.model import ChainBank, LookaheadCRF

C = 3       # labels
N_MAX = 4   # events: 3 ** 4 = 81 label sequences at most

scores = st.floats(-3, 3, allow_nan=False, width=32)


@st.composite
def crfs(draw, n_min: int = 1):
    """(emissions (n, C), transitions (C, C) [from, to]) as float64 arrays."""
    n = draw(st.integers(n_min, N_MAX))
    e = np.array(draw(st.lists(scores, min_size=n * C, max_size=n * C)), dtype=np.float64).reshape(n, C)
    a = np.array(draw(st.lists(scores, min_size=C * C, max_size=C * C)), dtype=np.float64).reshape(C, C)
    return e, a


def brute_marginals(e: np.ndarray, a: np.ndarray, seen: int) -> np.ndarray:
    """p(y_t = c | events 0 .. seen - 1) for t < seen, by enumerating every label sequence of
    the first ``seen`` events: score(y) = sum_t e[t, y_t] + sum_t a[y_t-1, y_t]."""
    seqs = np.array(list(itertools.product(range(C), repeat=seen)))                 # (C**seen, seen)
    score = e[np.arange(seen), seqs].sum(1) + a[seqs[:, :-1], seqs[:, 1:]].sum(1)
    log_z = np.logaddexp.reduce(score)                                             # log-partition
    p = np.exp(score - log_z)
    out = np.zeros((seen, C))
    for t in range(seen):
        np.add.at(out[t], seqs[:, t], p)
    return out


def oracle(e: np.ndarray, a: np.ndarray, lag: int | None) -> np.ndarray:
    """Row t: p(y_t | events 0 .. t + lag) (lag None: the whole session)."""
    n = len(e)
    rows = []
    for t in range(n):
        seen = n if lag is None else min(n, t + lag + 1)
        rows.append(brute_marginals(e, a, seen)[t])
    return np.array(rows)


def torch_crf(a: np.ndarray, window: int | None) -> LookaheadCRF:
    crf = LookaheadCRF(C, window).double()
    with torch.no_grad():
        crf.trans.copy_(torch.from_numpy(a))
    return crf


@settings(max_examples=60, deadline=None, derandomize=True)
@given(crfs(), st.sampled_from([0, 1, 2, None]))
def test_offline_marginals_equal_the_enumeration(ea, window):
    e, a = ea
    crf = torch_crf(a, window)
    got = crf(torch.from_numpy(e)[None], torch.tensor([len(e)]))[0].detach().exp().numpy()
    np.testing.assert_allclose(got, oracle(e, a, window), rtol=1e-6, atol=1e-9)
    # a narrower window asked for at call time (what training at a visible depth uses)
    if window is None:
        narrow = crf(torch.from_numpy(e)[None], torch.tensor([len(e)]), 1)[0].detach().exp().numpy()
        np.testing.assert_allclose(narrow, oracle(e, a, 1), rtol=1e-6, atol=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(crfs(), crfs(), st.sampled_from([0, 1, 2, None]))
def test_padding_changes_no_session(ea, eb, window):
    (e1, a), (e2, _) = ea, eb
    n = max(len(e1), len(e2))
    batch = np.zeros((2, n, C))
    batch[0, :len(e1)], batch[1, :len(e2)] = e1, e2
    batch[0, len(e1):] = batch[1, len(e2):] = 7.0          # padding that would show if it leaked
    out = torch_crf(a, window)(torch.from_numpy(batch), torch.tensor([len(e1), len(e2)])).detach().exp().numpy()
    np.testing.assert_allclose(out[0, :len(e1)], oracle(e1, a, window), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out[1, :len(e2)], oracle(e2, a, window), rtol=1e-6, atol=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(crfs(), st.integers(0, 2))
def test_streamed_marginals_equal_the_enumeration_of_what_has_arrived(ea, window):
    """``ChainBank.step`` with final emissions (no provisional rows), two sessions in one
    batch: after event m, each of the last min(m + 1, W + 1) events holds
    p(y_t | events 0 .. min(t + W, m))."""
    e, a = ea
    bank = ChainBank([torch_crf(a, window)], [0])
    other = e[::-1].copy()                                 # a second session, stepped alongside
    states = [bank.init_state("cpu"), bank.init_state("cpu")]
    for k in range(len(e)):
        emissions = torch.from_numpy(np.stack([e[k:k + 1], other[k:k + 1]]))      # (2, 1, C)
        states, lm = bank.step(states, [k + 1, k + 1], emissions)
        for got, seq in zip(lm[0], (e, other)):
            v = min(k + 1, window + 1)
            want = [brute_marginals(seq, a, min(t + window, k) + 1)[t] for t in range(k + 1 - v, k + 1)]
            np.testing.assert_allclose(got[window + 1 - v:].detach().exp().numpy(), np.array(want), rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(crfs(), st.sampled_from([0, 1, 2, 3, None]))
def test_baseline_lag_marginals_equal_the_enumeration(ea, lag):
    e, a = ea
    np.testing.assert_allclose(crf_lag_marginals(e, a, lag), oracle(e, a, lag), atol=1e-9)


def test_the_oracle_itself_on_a_hand_computed_case():
    # two events, two labels' worth of mass: with no transition scores the marginals are the
    # per-event softmaxes; a strong 0 -> 1 transition pulls event 1 towards label 1
    e = np.array([[0.0, 0.0, -50.0], [0.0, 0.0, -50.0]])
    flat = brute_marginals(e, np.zeros((C, C)), 2)
    np.testing.assert_allclose(flat[:, :2], 0.5, atol=1e-12)
    a = np.zeros((C, C))
    a[0, 1] = np.log(3.0)                                   # paths 00, 01 (x3), 10, 11 -> y1=1: 4/6
    np.testing.assert_allclose(brute_marginals(e, a, 2)[1, 1], 4 / 6, atol=1e-12)


def stepped_and_offline(scale: float, dtype: torch.dtype, lookahead: int = 16, seed: int = 0):
    """The served mixture's CRFs, stepped together in one ``ChainBank`` (K = lookahead + 1
    rows): a causal CRF (W = lookahead, no provisional rows) and one that reads the next event
    (W = lookahead - 1, one provisional row, whose emissions change once that event is in),
    over sessions that start in different rounds. Returns, per round, session and CRF, the rows
    ``step`` gave and the offline ``LookaheadCRF.forward`` of the emissions seen so far."""
    g = torch.Generator().manual_seed(seed)
    C, lengths, start = 6, [30, 1, 5, 17, 22], [0, 3, 0, 8, 1]
    crfs = [LookaheadCRF(C, lookahead).to(dtype), LookaheadCRF(C, lookahead - 1).to(dtype)]
    with torch.no_grad():
        for c in crfs:
            c.trans.copy_(scale * torch.randn(C, C, generator=g, dtype=dtype))
    bank = ChainBank(crfs, [0, 1])
    assert bank.K == lookahead + 1
    causal = [scale * torch.randn(n, C, generator=g, dtype=dtype) for n in lengths]
    ahead = [scale * torch.randn(n, C, generator=g, dtype=dtype) for n in lengths]
    provisional = [scale * torch.randn(n, C, generator=g, dtype=dtype) for n in lengths]
    states, out = {}, []
    for t in range(max(b + n for b, n in zip(start, lengths))):
        rnd = [i for i, n in enumerate(lengths) if start[i] <= t < start[i] + n]
        m = [t - start[i] for i in rnd]                                  # each one's newest event
        # rows: the causal CRF's newest; the other's event before it (final now) and newest
        # (provisional); before a session's start, a value that would show if it were read
        em = torch.stack([torch.stack([causal[i][k], ahead[i][k - 1] if k else torch.full((C,), 50.0, dtype=dtype),
                                       provisional[i][k]]) for i, k in zip(rnd, m)])
        new, lm = bank.step([states.get(i, bank.init_state("cpu")) for i in rnd], [k + 1 for k in m], em)
        states.update(zip(rnd, new))
        for j, (i, k) in enumerate(zip(rnd, m)):
            seen = [causal[i][:k + 1], torch.cat([ahead[i][:k], provisional[i][k:k + 1]])]
            for c, (crf, e) in enumerate(zip(crfs, seen)):
                want = crf(e[None], torch.tensor([k + 1]))[0].detach()
                v = min(k + 1, bank.K)
                out.append((lm[c, j, bank.K - v:].detach(), want[k + 1 - v:]))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale, log_space", [(1.0, False), (30.0, False), (300.0, True)])
@pytest.mark.parametrize("lookahead", [16, 1])
def test_streamed_crfs_equal_the_offline_forward(lookahead, scale, log_space, dtype, monkeypatch):
    """The live backward messages run in probability space (``ChainBank._retreat``) and fall
    back to log space when a sum underflows: both give what the offline forward gives, at the
    default lookahead 16 and at 1 (where the CRF reading ahead has no backward window). At
    scale 30 the transitions and emissions span hundreds of nats, past what float32 sums of
    probabilities could hold; at 300 even float64 underflows, and the fallback is what runs."""
    fell_back = []
    log_path = ChainBank._retreat_log
    monkeypatch.setattr(ChainBank, "_retreat_log", lambda self, *a: fell_back.append(1) or log_path(self, *a))
    rows = stepped_and_offline(scale, dtype, lookahead)
    assert bool(fell_back) is log_space
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for got, want in rows:
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **tol)
