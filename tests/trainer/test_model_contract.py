"""The encoder contract: every architecture x fusion variant, with and without the CRF output
layer, passes the same suite."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from trainer.features import EncodedSession
from trainer.config import ModelConfig
from trainer.model import ENCODERS, IGNORE, Tagger, collate

ARCHS = sorted(ENCODERS)
FUSIONS = ["concat", "gated", "sum", "cross_attention", "late"]
# (arch, fusion, crf): every arch x fusion, plus the CRF layer on every arch (concat and late)
VARIANTS = ([(a, f, False) for a, f in itertools.product(ARCHS, FUSIONS)]
            + [(a, f, True) for a, f in itertools.product(ARCHS, ["concat", "late"])])
LOOKAHEAD_VARIANTS = [(a, crf) for a in ARCHS for crf in (False, True)]


def make_args(arch, fusion, lookahead=2, crf=False, **kw):
    base = dict(n_labels=5, n_events=20, n_tokens=30, cat_sizes=(5, 7), n_nums=4, text_dim=6,
                image_size=8, arch=arch, fusion=fusion, lookahead=lookahead, context=6,
                hidden_dim=16, nhead=2, ff_dim=32, num_layers=2, dropout=0.1, n_lex=25, lex_dim=8,
                crf_head=crf)
    base.update(kw)
    return ModelConfig(**base)


def build(args):
    """A model whose wide path is not zero (it starts at zero, which would hide it)."""
    model = Tagger(args)
    if model.wide is not None:
        torch.nn.init.normal_(model.wide.table)
    return model


def session(n, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    lex = rng.integers(1, 25, (n, 5))
    lex[rng.random((n, 5)) < 0.3] = 0                  # ragged bags, some events without any
    return EncodedSession(
        event=rng.integers(0, 20, n), tokens=rng.integers(0, 30, (n, 16)), cats=rng.integers(0, 5, (n, 2)),
        nums=rng.normal(size=(n, 4)).astype(np.float32), text=rng.normal(size=(n, 6)).astype(np.float32),
        image=rng.integers(0, 255, (n, 3, 8, 8)).astype(np.uint8),
        labels=rng.integers(0, 5, n) if labels else None, lex=lex)


def stream_outputs(model, s):
    """Label a growing prefix event by event; return the logits each position had when final
    (its last output: the one with the most later events in)."""
    final = {}
    for k, rows in sorted(stream_by_depth(model, s).items()):
        final.update(rows)
    return torch.stack([final[i] for i in range(len(s))])


@pytest.mark.parametrize("arch,fusion,crf", VARIANTS)
def test_shapes_loss_and_gradients(arch, fusion, crf):
    torch.manual_seed(0)
    model = Tagger(make_args(arch, fusion, crf=crf))
    batch, tgt = collate([session(9, 1), session(4, 2)], with_targets=True)
    logits, loss = model(batch, tgt)
    assert logits.shape == (2, 9, 5)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch,fusion,crf", VARIANTS)
def test_padding_does_not_change_predictions(arch, fusion, crf):
    torch.manual_seed(0)
    model = build(make_args(arch, fusion, crf=crf)).eval()
    short = session(5, 3)
    alone, _ = model(collate([short]))
    padded, _ = model(collate([short, session(12, 4)]))
    assert torch.allclose(alone[0], padded[0, :5], atol=1e-5)


@pytest.mark.parametrize("arch,fusion,crf", VARIANTS)
def test_prefix_labelling_matches_whole_session(arch, fusion, crf):
    """Labelling a growing prefix event by event ends where the offline forward pass is."""
    torch.manual_seed(0)
    model = build(make_args(arch, fusion, crf=crf)).eval()
    s = session(15, 5)  # longer than context + lookahead: windows slide
    full, _ = model(collate([s]))
    assert torch.allclose(stream_outputs(model, s), full[0], atol=1e-4)


@pytest.mark.parametrize("arch,crf", LOOKAHEAD_VARIANTS)
def test_lookahead_bounds_what_an_event_sees(arch, crf):
    """Changing event t+L+1 must not change the output at t; changing t+L may."""
    torch.manual_seed(0)
    L = 2
    model = build(make_args(arch, "concat", lookahead=L, crf=crf)).eval()
    if crf:  # untrained transitions are all zero, which would hide the CRF's own lookahead
        torch.nn.init.normal_(model.crf.trans)
    s = session(12, 6)
    base, _ = model(collate([s]))
    t = 3
    far = session(12, 6)
    far.event = far.event.copy()
    far.event[t + L + 1] = (far.event[t + L + 1] + 7) % 20
    changed, _ = model(collate([far]))
    assert torch.allclose(base[0, t], changed[0, t], atol=1e-6)
    near = session(12, 6)
    near.event = near.event.copy()
    near.event[t + L] = (near.event[t + L] + 7) % 20
    changed, _ = model(collate([near]))
    assert not torch.allclose(base[0, t], changed[0, t], atol=1e-6)


def stream_by_depth(model, s):
    """Label a growing prefix event by event; {k: {position: logits when k later events were in}}."""
    seen: dict[int, dict[int, torch.Tensor]] = {}
    state = [model.init_state()]
    for t in range(len(s)):
        batch = collate([s.rows(t, t + 1)])
        batch.pop("lengths")
        state, outs = model.step(state, batch)
        o = outs[0]
        for j in range(len(o)):
            seen.setdefault(len(o) - 1 - j, {})[t - len(o) + 1 + j] = o[j]
    return seen


@pytest.mark.parametrize("arch", [a for a in ARCHS if getattr(ENCODERS[a], "supports_horizon", False)])
def test_every_visible_depth_is_the_forward_pass_at_that_horizon(arch):
    """Training at every depth k = 0..L is only honest if the label the live worker shows with
    k later events in is exactly the forward pass whose positions see k events ahead."""
    torch.manual_seed(0)
    L = 3
    model = build(make_args(arch, "concat", lookahead=L)).eval()
    s = session(14, 11)
    seen = stream_by_depth(model, s)
    for k in range(L + 1):
        batch = collate([s])
        batch["horizon"] = torch.full((1, len(s)), k, dtype=torch.long)
        full, _ = model(batch)
        for t in range(len(s) - k):                     # depth k exists only before the end
            assert torch.allclose(seen[k][t], full[0, t], atol=1e-4), (k, t)


def test_wide_path_sees_its_window_only():
    """The linear lexical part reads events t-2 .. t+2 and nothing else."""
    torch.manual_seed(0)
    model = build(make_args("bilstm", "concat", lookahead=4, wide_past=2, wide_future=2)).eval()
    s = session(12, 12)
    b = collate([s])
    base = model.wide(b["lex"], b["nums"], torch.tensor([12]))
    t = 5
    for far in (t - 3, t + 3):
        other = session(12, 12)
        other.lex = other.lex.copy()
        other.lex[far] = (other.lex[far] % 24) + 1
        ob = collate([other])
        changed = model.wide(ob["lex"], ob["nums"], torch.tensor([12]))
        assert torch.allclose(base[0, t], changed[0, t])
    for near in (t - 2, t, t + 2):
        other = session(12, 12)
        other.lex = other.lex.copy()
        other.lex[near] = (other.lex[near] % 24) + 1
        ob = collate([other])
        changed = model.wide(ob["lex"], ob["nums"], torch.tensor([12]))
        assert not torch.allclose(base[0, t], changed[0, t])


def test_wide_path_on_sessions_shorter_than_its_window():
    """A one-event session (shorter than the lookahead) in a batch: one score per event, and
    the same scores as that session alone. Depth training reaches this with small batches."""
    torch.manual_seed(0)
    model = build(make_args("bilstm", "concat", lookahead=4, wide_past=2, wide_future=3)).eval()
    short, long = session(1, 3), session(2, 4)
    for batch in ([short], [short, long], [long, short]):
        b = collate(batch)
        lengths = torch.tensor([len(s) for s in batch])
        out = model.wide(b["lex"], b["nums"], lengths, horizon=torch.full(b["lex"].shape[:2], 3))
        assert out.shape[:2] == b["lex"].shape[:2]
        i = next(j for j, s in enumerate(batch) if s is short)
        alone = collate([short])
        want = model.wide(alone["lex"], alone["nums"], torch.tensor([1]))
        assert torch.allclose(out[i, :1], want[0, :1], atol=1e-6)


@pytest.mark.parametrize("arch,crf", [("bilstm", False), ("transformer", False),
                                      ("ht_transformer", False), ("bilstm", True)])
def test_unbounded_lookahead_sees_the_whole_future(arch, crf):
    torch.manual_seed(0)
    model = Tagger(make_args(arch, "concat", lookahead=None, context=32, crf=crf)).eval()
    assert not model.streamable
    s = session(12, 7)
    base, _ = model(collate([s]))
    far = session(12, 7)
    far.event = far.event.copy()
    far.event[11] = (far.event[11] + 7) % 20
    changed, _ = model(collate([far]))
    assert not torch.allclose(base[0, 0], changed[0, 0], atol=1e-6)


@pytest.mark.parametrize("arch,fusion,crf", VARIANTS)
def test_save_and_load_give_identical_predictions(arch, fusion, crf, tmp_path):
    torch.manual_seed(0)
    args = make_args(arch, fusion, crf=crf)
    model = build(args).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    again = Tagger(ModelConfig.from_args(args.to_args())).eval()
    again.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    batch = collate([session(7, 8)])
    assert torch.equal(model(batch)[0], again(batch)[0])


def test_focal_loss_and_class_weights_ignore_padding():
    torch.manual_seed(0)
    args = make_args("bilstm", "concat")
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0])
    for kind in ("ce", "focal"):
        model = Tagger(args, weights, loss=kind)
        batch, tgt = collate([session(6, 9), session(3, 10)], with_targets=True)
        assert (tgt[1, 3:] == IGNORE).all()
        _, loss = model(batch, tgt)
        assert torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("future", [0, 2])
def test_crf_arch_streams_to_its_offline_output(future):
    """With state features that read later events too, finals still equal offline."""
    torch.manual_seed(0)
    model = build(make_args("crf", "concat", lookahead=4, wide_future=future)).eval()
    torch.nn.init.normal_(model.crf.trans)
    s = session(15, 5)
    full, _ = model(collate([s]))
    assert torch.allclose(stream_outputs(model, s), full[0], atol=1e-4)


@pytest.mark.parametrize("arch,crf", [(a, c) for a in ARCHS for c in (False, True)] + [("crf", False)])
def test_depth_logits_equal_the_streamed_ones(arch, crf):
    """Calibration reads each depth's logits from whole-session passes when the model says
    that is exact (``depth_exact``); whichever way, they are what ``step`` shows."""
    from trainer.train import prefix_logits
    torch.manual_seed(0)
    L = 2
    model = build(make_args(arch, "concat", lookahead=L, crf=crf)).eval()
    if model.crf is not None:
        torch.nn.init.normal_(model.crf.trans)
    sessions = [session(9, 20), session(4, 21)]
    z, y = prefix_logits(model, sessions, "cpu")
    expect = {k: [] for k in range(L + 1)}
    for s in sessions:
        seen = stream_by_depth(model, s)
        for k in range(L + 1):
            expect[k] += [seen[k][t] for t in range(len(s) - k)]
    for k in range(L + 1):
        got = torch.from_numpy(z[k])
        want = torch.stack(expect[k])
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-4)           # session order, then position
        assert np.array_equal(y[k], np.concatenate([s.labels[:len(s) - k] for s in sessions]))


def _brute_marginals(e: np.ndarray, A: np.ndarray, t: int, upto: int) -> np.ndarray:
    """p(y_t | events 0..upto) of a linear-chain CRF by enumerating every label path."""
    C = e.shape[1]
    p = np.zeros(C)
    for ys in itertools.product(range(C), repeat=upto + 1):
        score = sum(e[i, y] for i, y in enumerate(ys)) + sum(A[a, b] for a, b in zip(ys, ys[1:]))
        p[ys[t]] += np.exp(score)
    return p / p.sum()


def test_crf_arch_is_exact_filtering_and_fixed_lag_smoothing():
    """The CRF architecture against brute-force enumeration over short sessions: offline it
    is p(y_t | events up to t + L); streamed with k later events in, p(y_t | events up to
    t + k) (k = 0: forward filtering, the label on arrival)."""
    from trainer.baseline import crf_lag_marginals
    torch.manual_seed(0)
    L = 3
    model = Tagger(make_args("crf", "concat", lookahead=L, n_labels=3, wide_future=0)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.wide.table)
        torch.nn.init.normal_(model.wide.nums, std=0.3)
        torch.nn.init.normal_(model.wide.before_start)
        torch.nn.init.normal_(model.crf.trans)
    s = session(7, 3)
    b = collate([s])
    with torch.no_grad():
        e = model.wide(b["lex"], b["nums"], b["lengths"])[0].double().numpy()
        offline = torch.softmax(model(b)[0][0], -1).double().numpy()
    A = model.crf.trans.detach().double().numpy()
    for t in range(len(s)):
        assert np.allclose(_brute_marginals(e, A, t, min(len(s) - 1, t + L)), offline[t], atol=1e-5)
    assert np.allclose(crf_lag_marginals(e, A, L), offline, atol=1e-5)    # the numpy twin agrees
    seen = stream_by_depth(model, s)
    for k in range(L + 1):
        for t in range(len(s) - k):
            got = torch.softmax(seen[k][t], -1).double().numpy()
            assert np.allclose(_brute_marginals(e, A, t, t + k), got, atol=1e-5), (k, t)


def assert_streams_at_every_depth_like_forward(model, s, L) -> dict:
    """What ``model`` shows for session ``s`` with k = 0..L later events in is its forward pass
    at horizon k; returns the streamed rows by depth."""
    seen = stream_by_depth(model, s)
    for k in range(L + 1):
        batch = collate([s])
        batch["horizon"] = torch.full((1, len(s)), k, dtype=torch.long)
        full, _ = model(batch)
        for t in range(len(s) - k):
            assert torch.allclose(seen[k][t], full[0, t], atol=1e-4), (k, t)
    return seen


@pytest.mark.parametrize("biased", [False, True], ids=["no_bias", "depth_bias"])
def test_mixture_streams_every_depth_like_its_forward_pass(tmp_path, biased):
    """A mixture weighs its members differently at each depth (and may add a label bias per
    depth: ``auto``'s prior correction); what it shows with k later events in is still its
    forward pass at horizon k, and it saves and loads."""
    from trainer.model import Mixture, MixtureConfig, build_model, checkpoint_args
    torch.manual_seed(0)
    L = 2
    members = [build(make_args("bilstm", "concat", lookahead=L)), build(make_args("crf", "concat", lookahead=L,
                                                                                   wide_future=0))]
    torch.nn.init.normal_(members[1].crf.trans)
    C = members[0].args.n_labels
    bias = [[float(x) for x in torch.randn(C) * 2] for _ in range(L + 1)] if biased else None
    args = MixtureConfig([m.args.to_args() for m in members], [[0.2, 0.8], [0.5, 0.5], [0.7, 0.3]], bias)
    mix = Mixture(args).eval()
    for m, src in zip(mix.members, members):
        m.load_state_dict(src.state_dict())
    assert mix.depth_exact
    s = session(10, 30)
    seen = assert_streams_at_every_depth_like_forward(mix, s, L)
    # the session's tail, final at its end, is the forward pass with the depth each event reached
    final, _ = mix(collate([s, session(13, 31)]))
    for t in range(len(s) - L, len(s)):
        assert torch.allclose(seen[len(s) - 1 - t][t], final[0, t], atol=1e-4), t
    torch.save(mix.state_dict(), tmp_path / "w.pt")
    again = build_model(checkpoint_args(args.to_args())).eval()
    again.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    assert torch.equal(mix(collate([s]))[0], again(collate([s]))[0])
    if biased:    # the bias is there: without it the scores differ at every depth
        plain = Mixture(MixtureConfig(args.members, args.depth_weights)).eval()
        plain.load_state_dict({k: v for k, v in mix.state_dict().items() if k != "bias"})
        assert not torch.allclose(plain(collate([s]))[0], mix(collate([s]))[0], atol=1e-2)


def test_a_member_that_does_not_read_some_lexical_ids_streams_like_its_forward_pass():
    """``data.time_of_day: auto``: the network member does not read the time of day's lexical
    ids (``lex_ignore``), the CRF member beside it does. Training masks them, so the
    network's wide rows for them stay at their initial 0 (set here as training leaves them)
    and the mixture's shared wide bank may step the unmasked ids: what the mixture shows with
    k later events in is its forward pass at horizon k, and the network's labels are the
    same with those ids removed from its input, offline and live."""
    from trainer.crf import without_lex
    from trainer.model import Mixture, MixtureConfig
    torch.manual_seed(0)
    L, ignored = 2, (22, 23, 24)                       # the last ids, as the encoder puts them
    net = build(make_args("bilstm", "concat", lookahead=L, lex_ignore=ignored))
    with torch.no_grad():
        net.wide.table[list(ignored)] = 0.0
    crf = build(make_args("crf", "concat", lookahead=L, wide_future=0))
    torch.nn.init.normal_(crf.crf.trans)
    mix = Mixture(MixtureConfig([net.args.to_args(), crf.args.to_args()], [[0.5, 0.5], [0.3, 0.7], [0.6, 0.4]])).eval()
    for m, src in zip(mix.members, (net, crf)):
        m.load_state_dict(src.state_dict())
    s = session(10, 70)
    assert np.isin(s.lex, ignored).any()
    assert_streams_at_every_depth_like_forward(mix, s, L)
    blind = without_lex([s], np.array(ignored))[0]
    net.eval()
    assert torch.equal(net(collate([s]))[0], net(collate([blind]))[0])
    assert torch.allclose(stream_outputs(net, s), stream_outputs(net, blind), atol=1e-6)
    assert not torch.allclose(crf.eval()(collate([s]))[0], crf(collate([blind]))[0], atol=1e-3)


def served_in_rounds(model, sessions, start) -> dict:
    """Stream sessions as the worker does, session i's first event in round ``start[i]``, so
    that rounds mix young and old sessions: (session, round) -> the rows ``step`` showed."""
    states, outs = {}, {}
    for t in range(max(b + len(s) for b, s in zip(start, sessions))):
        rnd = [i for i, s in enumerate(sessions) if start[i] <= t < start[i] + len(s)]
        batch = collate([sessions[i].rows(t - start[i], t - start[i] + 1) for i in rnd])
        batch.pop("lengths")
        new, o = model.step([states.get(i) or model.init_state() for i in rnd], batch)
        for i, st, rows in zip(rnd, new, o):
            states[i], outs[i, t] = st, rows
    return outs


@pytest.mark.parametrize("shallow", [False, True], ids=["weighed_everywhere", "some_weighed_shallow"])
@pytest.mark.parametrize("L", [4, 1, 0])
def test_a_mixtures_members_step_together_as_each_would_alone(L, shallow):
    """The served mixture steps its members' wide paths as one (``WideBank``) and its CRF
    members' CRFs as one (``ChainBank``): members that read different numbers of events before
    and after an event (with L = 1 a member that reads the next event has no backward window
    left), in rounds that mix sessions at their start (fewer events than the lookahead) with
    sessions well past it, label every row as the members' own ``step`` would, mixed with the
    weights of the row's depth; also where the first member is weighed on arrival only and
    another only to depth 1 (their rows at the other depths are left out, not computed)."""
    from trainer.model import Mixture, MixtureConfig
    torch.manual_seed(0)
    members = [build(make_args("bilstm", "concat", lookahead=L)),
               build(make_args("crf", "concat", lookahead=L, wide_future=0)),
               build(make_args("crf", "concat", lookahead=L, wide_future=1)),
               build(make_args("crf", "concat", lookahead=L, wide_future=2, wide_past=3))]
    for m in members:
        with torch.no_grad():
            for p in (m.wide.before_start, m.wide.bias) + ((m.crf.trans,) if m.crf is not None else ()):
                torch.nn.init.normal_(p)
            torch.nn.init.normal_(m.wide.nums, std=0.3)
    weights = [[float(x) for x in torch.rand(len(members))] for _ in range(L + 1)]
    if shallow:
        for k in range(1, L + 1):
            weights[k][0] = 0.0
        for k in range(2, L + 1):
            weights[k][2] = 0.0
    sessions = [session(n, 40 + i) for i, n in enumerate([12, 3, 9, 1, 15, 6])]
    start = [0, 2, 0, 5, 1, 3]                        # rounds mix young and old sessions
    mix = Mixture(MixtureConfig([m.args.to_args() for m in members], weights)).eval()
    for m, src in zip(mix.members, members):
        m.load_state_dict(src.state_dict())
    assert len(mix.wide_bank.wides) == 4 and len(mix.chain_bank.crfs) == 3

    together = served_in_rounds(mix, sessions, start)
    alone = [served_in_rounds(m.eval(), sessions, start) for m in members]   # each member its own step
    assert together.keys() == alone[0].keys() and len(together) == sum(len(s) for s in sessions)
    w = torch.tensor(weights)
    for key, got in together.items():
        rows = [a[key] for a in alone]
        depth = torch.arange(len(got) - 1, -1, -1)
        want = sum(w[depth, i:i + 1] * torch.log_softmax(r, -1) for i, r in enumerate(rows))
        assert got.shape == want.shape, key
        assert torch.allclose(got, want, atol=1e-5), key


@pytest.mark.parametrize("reach,held", [(4, 2), (3, 1), (0, 0)], ids=["every_depth", "to_depth_3", "arrival_only"])
def test_a_mixture_whose_network_reads_less_far_holds_its_final_rows(reach, held):
    """``model.network_lookahead``: the network member reads 2 later events, the CRF members
    (and so the mixture) 4. Streamed in rounds that mix young and old sessions, each row the
    mixture shows with k later events in mixes every member's row at depth min(k, its own
    lookahead) (past 2 the network's final row, held in the session's state) with the
    weights of depth k, and a session's tail at its end is the offline output. A session
    holds the network's final rows only as far back as a depth that weighs it: none when it
    is weighed on arrival only (``bilstm_causal``)."""
    from trainer.model import Mixture, MixtureConfig
    torch.manual_seed(0)
    members = [build(make_args("bilstm", "concat", lookahead=2)),
               build(make_args("crf", "concat", lookahead=4, wide_future=0)),
               build(make_args("crf", "concat", lookahead=4, wide_future=1))]
    for m in members[1:]:
        torch.nn.init.normal_(m.crf.trans)
    weights = [[float(x) for x in torch.rand(3)] for _ in range(5)]
    for k in range(reach + 1, 5):
        weights[k][0] = 0.0
    mix = Mixture(MixtureConfig([m.args.to_args() for m in members], weights)).eval()
    for m, src in zip(mix.members, members):
        m.load_state_dict(src.state_dict())
    assert mix.args.lookahead == 4
    sessions = [session(n, 60 + i) for i, n in enumerate([11, 2, 7, 1, 14])]
    start = [0, 3, 1, 6, 2]

    def served(model) -> dict:
        """(session, depth, position) -> the row ``step`` showed"""
        seen = {}
        for (i, t), rows in served_in_rounds(model, sessions, start).items():
            n = t - start[i] + 1
            assert len(rows) == min(n, model.args.lookahead + 1)
            for j, row in enumerate(rows):
                seen[i, len(rows) - 1 - j, n - len(rows) + j] = row
        return seen

    state = mix.init_state()
    assert [len(h) for h in state.get("held", {}).values()] == ([held] if held else [])
    together = served(mix)
    alone = [served(m.eval()) for m in members]
    w = torch.tensor(weights)
    for (i, k, t), got in together.items():
        want = sum(w[k, m] * torch.log_softmax(a[i, min(k, members[m].args.lookahead), t], -1)
                   for m, a in enumerate(alone))
        assert torch.allclose(got, want, atol=1e-5), (i, k, t)
    for i, s in enumerate(sessions):
        final, _ = mix(collate([s]))
        for t in range(len(s)):
            assert torch.allclose(together[i, min(4, len(s) - 1 - t), t], final[0, t], atol=1e-4), (i, t)
