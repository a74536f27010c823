"""Training policies: how a network is validated, the depths it trains at, and what training
says about the labels shown before they are final."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import from_dict
from trainer.errors import ConfigError
from trainer.features import PAD, UNK
from trainer.fit import drop_features, sample_horizons
from trainer.train import FOLDS_BELOW, calibrate, depth_summary, stable_policy, validation_plan


def test_few_sessions_are_validated_on_folds_many_on_a_split():
    auto = from_dict({})
    assert validation_plan(20, auto) == "folds"
    assert validation_plan(FOLDS_BELOW, auto) == "split"
    assert validation_plan(20, from_dict({"train": {"validation": "split"}})) == "split"
    assert validation_plan(500, from_dict({"train": {"validation": "folds"}})) == "folds"
    assert validation_plan(1, from_dict({"train": {"validation": "folds"}})) == "split"


def test_every_depth_is_trained_and_the_final_one_most():
    k = sample_horizons((200, 50), 4, np.random.default_rng(0)).numpy()
    share = np.bincount(k.ravel(), minlength=5) / k.size
    assert set(np.unique(k)) == {0, 1, 2, 3, 4}
    assert 0.45 < share[4] < 0.55 and all(0.1 < s < 0.15 for s in share[:4])


def test_feature_dropout_blanks_lexical_ids_and_hides_templates_but_never_touches_padding():
    rng = np.random.default_rng(0)
    lex = torch.from_numpy(rng.integers(2, 500, size=(8, 100, 12)))
    lex[:, :, 9:] = PAD                                   # events with fewer features
    lex[:, 90:] = PAD                                     # a padded tail
    event = torch.from_numpy(rng.integers(2, 300, size=(8, 100)))
    event[:, 90:] = PAD
    event[:, 0] = UNK                                     # a template unseen in training
    batch = {"lex": lex.clone(), "event": event.clone()}
    drop_features(batch, 0.3, np.random.default_rng(1))
    real = lex != PAD
    dropped = real & (batch["lex"] == PAD)
    assert 0.27 < dropped.sum() / real.sum() < 0.33       # about p of the features
    kept = real & ~dropped
    assert torch.equal(batch["lex"][kept], lex[kept]) and (batch["lex"][~real] == PAD).all()
    hidden = (event > UNK) & (batch["event"] == UNK)
    assert 0.27 < hidden.sum() / (event > UNK).sum() < 0.33
    assert (batch["event"][event == PAD] == PAD).all() and (batch["event"][:, 0] == UNK).all()
    assert torch.equal(batch["event"][~hidden], event[~hidden])
    assert from_dict({"train": {"feature_dropout": 0.2}}).train.feature_dropout == 0.2
    with pytest.raises(ConfigError, match="train.feature_dropout"):
        from_dict({"train": {"feature_dropout": 1.0}})


def test_training_says_in_one_line_which_depths_will_abstain():
    depths = [{"k": 0, "top1_accuracy": 0.41, "top1_macro_f1": 0.3, "coverage": 0.0, "feasible": False},
              {"k": 1, "top1_accuracy": 0.52, "top1_macro_f1": 0.4, "coverage": 0.0, "feasible": False},
              {"k": 2, "top1_accuracy": 0.61, "top1_macro_f1": 0.5, "coverage": 0.2, "feasible": True}]
    lines = depth_summary(depths, 0.95)
    assert "k=0: top-1 acc 0.410, macro-F1 0.300, coverage 0.000" in lines[0]
    assert len(lines) == 2 and "k = 0, 1" in lines[1] and "precision 0.95" in lines[1]
    assert len(depth_summary(depths[2:], 0.95)) == 1


def _arrival_and_final(seed: int = 0, n: int = 4000, classes: int = 4):
    """Held-out logits where the final view is right everywhere and sure on 60% of events,
    and the arrival view guesses the label right half of the time, its confidence unrelated
    to being right: showing the most confident arrival labels means many revisions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    sure = rng.random(n) < 0.6
    final = np.zeros((n, classes))
    final[np.arange(n), y] = np.where(sure, 8.0, 0.5)
    first = np.zeros((n, classes))
    guess = np.where(rng.random(n) < 0.5, y, rng.integers(0, classes, n))
    first[np.arange(n), guess] = rng.uniform(0.0, 8.0, n)
    return first, final, y


def _policy(first, final, y, budget, final_too=False):
    return stable_policy(first, final, y, from_dict({"train": {"max_edit_overhead": budget,
                                                               "edit_overhead_final": final_too}}),
                         1.0, 1.0, 0.99)


def test_arrival_threshold_keeps_revisions_within_the_edit_overhead_budget():
    _, final, y = _arrival_and_final()
    # the arrival view already says what the final one will: matching the final's plain
    # coverage (60%) leaves 40% of events abstained on arrival and labelled at the end
    free, capped = _policy(final, final, y, 1.0), _policy(final, final, y, 0.08)
    assert free["first_rule"] == "coverage" and free["revised_share"] > 0.3
    # edit overhead = r / (1 + r): 0.08 allows a revised share of 0.087, bounded above
    assert capped["first_rule"] == "edit_overhead"
    assert capped["revised_share"] <= capped["revised_upper"] <= 0.08 / 0.92
    assert capped["first_coverage"] > free["first_coverage"]
    assert capped["precision"] >= 0.95 and capped["coverage"] >= free["coverage"]


def test_the_arrival_threshold_sits_clear_of_every_held_out_confidence():
    """Sessions that start alike give their first events the same arrival confidence, and a
    live round sums in another order than an offline pass: a threshold equal to one of those
    confidences would let float rounding decide whether an event is shown on arrival, and so
    whether its final label is kept (gen's 5-fold CV once had 3 finals differ from offline).
    Whichever rule picks it, the arrival threshold is a hair below the confidence it was read
    at, not on it."""
    from trainer.artifacts import softmax_t
    for first, final, y in (_arrival_and_final(), _arrival_and_final(1)):
        first[:1000] = first[0]                          # a quarter of the events look alike
        c0 = softmax_t(first, 1.0).max(-1)
        for budget in (1.0, 0.08):
            pol = _policy(first, final, y, budget)
            t = pol["first_threshold"]
            assert not np.isclose(c0, t, rtol=0.0, atol=1e-7).any(), (pol["first_rule"], t)
            assert (c0 >= t).mean() == pytest.approx(pol["first_coverage"])


def test_the_served_policy_certifies_its_precision_over_held_out_days_not_events():
    """Sixteen held-out days: half the events are sure and right; 30% are half-sure, right 97%
    of the time on fourteen days and 40% on two. Pooled, the half-sure labels pass a
    binomial bound over the 3,200 covered events (0.96), but that precision is two kinds of
    day averaged, and a new day like the bad two gets 0.78. Over sessions the bound sees the
    spread and keeps only the sure half; ``guarantee_over: events`` keeps the old bound."""
    rng = np.random.default_rng(3)
    days, per_day, classes = 16, 250, 4
    day = np.repeat(np.arange(days), per_day)
    n = days * per_day
    y = rng.integers(0, classes, n)
    kind = rng.choice(3, n, p=[0.5, 0.3, 0.2])               # sure, half-sure, unsure
    right = np.where(kind == 0, True, rng.random(n) < np.where(day < 2, 0.4, 0.97))
    label = np.where(right, y, (y + rng.integers(1, classes, n)) % classes)
    final = np.zeros((n, classes))
    final[np.arange(n), label] = np.select([kind == 0, kind == 1], [9.0, 6.0], 0.3)
    policies = {}
    for over in ("sessions", "events"):
        cfg = from_dict({"train": {"max_edit_overhead": 1.0, "guarantee_over": over}})
        # as training does: the plain threshold from ``calibrate``, then the served policy
        temperature, plain = calibrate(np.split(final, days), np.split(y, days), cfg)
        policies[over] = stable_policy(final, final, y, cfg, temperature, temperature, plain["threshold"],
                                       sessions=day)
        assert plain["coverage"] == pytest.approx(policies[over]["coverage"])
    events, sessions = policies["events"], policies["sessions"]
    assert events["coverage"] == pytest.approx(0.8, abs=0.02) and events["lower_bound"] >= 0.95
    assert sessions["coverage"] == pytest.approx(0.5, abs=0.02) and sessions["lower_bound"] >= 0.95
    assert sessions["first_threshold"] > events["first_threshold"]
    # without session ids the bound is the binomial one, whatever the setting
    assert stable_policy(final, final, y, from_dict({"train": {"max_edit_overhead": 1.0}}), temperature,
                         temperature, plain["threshold"])["coverage"] == pytest.approx(events["coverage"])


def test_the_edit_overhead_budget_is_bounded_over_held_out_days_as_the_precision_is():
    """Sixteen held-out days: half the events are sure on arrival and in the end; on two days
    every other event also looks sure on arrival (at a confidence amid the sure ones') and is
    withdrawn in the end. Pooled, 7.8% of events are revised, which a binomial bound over
    4,000 events holds within the 0.08 budget (a revised share of 0.087). But the revisions
    are two days' worth, and a new day like those revises half its events: over days the
    bound is far above the budget, so training must not claim it (the rule says so)."""
    rng = np.random.default_rng(4)
    days, per_day, classes = 16, 250, 4
    day = np.repeat(np.arange(days), per_day)
    n = days * per_day
    y = rng.integers(0, classes, n)
    sure = rng.random(n) < 0.5
    other = (y + rng.integers(1, classes, n)) % classes
    label = np.where(sure | (rng.random(n) < 0.5), y, other)     # the unsure: right half the time
    final = np.zeros((n, classes))
    final[np.arange(n), label] = np.where(sure, 9.0, 0.3)
    bad = (day < 2) & ~sure
    first = np.zeros((n, classes))
    first[np.arange(n), np.where(sure, label, other)] = np.where(sure, rng.uniform(6, 12, n),
                                                                 np.where(bad, 8.5, 0.3))
    pol = {over: stable_policy(first, final, y, from_dict({"train": {"max_edit_overhead": 0.08,
                                                                      "guarantee_over": over}}),
                               1.0, 1.0, 0.99, sessions=day)
           for over in ("sessions", "events")}
    events, sessions = pol["events"], pol["sessions"]
    # the same thresholds and the same held-out revisions; only the bound differs
    assert sessions["first_threshold"] == events["first_threshold"]
    assert sessions["revised_share"] == events["revised_share"] == pytest.approx(0.078, abs=0.005)
    assert events["revised_upper"] <= 0.08 / 0.92 and events["first_rule"] == "edit_overhead"
    assert sessions["revised_upper"] > 0.15 and sessions["first_rule"] == "fewest_revisions"


def test_when_no_arrival_threshold_is_within_budget_the_fewest_revisions_win():
    first, final, y = _arrival_and_final()   # arrival confidence unrelated to being right
    free, capped = _policy(first, final, y, 1.0), _policy(first, final, y, 0.08)
    assert capped["first_rule"] == "fewest_revisions"
    assert capped["revised_share"] < free["revised_share"] and capped["precision"] >= 0.95



def test_a_higher_final_threshold_keeps_revisions_within_budget_when_arrival_cannot():
    """``train.edit_overhead_final``. Half of the events are sure in both views; 30% become sure only once later events are
    seen (the arrival view guesses); 20% stay unsure. Every arrival threshold leaves those 30%
    filled in late, over the budget, so the final threshold rises towards the events both
    views are sure of: fewer labels in the end, revisions within the budget, and still at
    the precision target."""
    rng = np.random.default_rng(2)
    n, classes = 4000, 4
    y = rng.integers(0, classes, n)
    group = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    guess = rng.integers(0, classes, n)
    final = np.zeros((n, classes))
    final[np.arange(n), np.where(group == 2, guess, y)] = np.select(
        [group == 0, group == 1], [rng.uniform(8.5, 9.5, n), rng.uniform(6.0, 7.0, n)], 0.5)
    first = np.zeros((n, classes))
    first[np.arange(n), np.where(group == 0, y, guess)] = np.where(group == 0, final.max(-1), rng.uniform(0, 3, n))
    free, capped = _policy(first, final, y, 1.0, True), _policy(first, final, y, 0.08, True)
    assert free["coverage"] == pytest.approx(0.8, abs=0.03) and free["precision"] >= 0.95
    # by default (train.edit_overhead_final: false) the final labels stay, over the budget
    kept = _policy(first, final, y, 0.08)
    assert kept["coverage"] >= free["coverage"] and kept["precision"] >= 0.95
    assert kept["first_rule"] == "fewest_revisions" and kept["revised_upper"] > 0.08 / 0.92
    assert capped["first_rule"] == "edit_overhead" and capped["threshold"] > free["threshold"]
    assert capped["revised_upper"] <= 0.08 / 0.92 < free["revised_share"]
    # about the sure half and the surest of the rest are kept: fewer, not none
    assert 0.45 < capped["coverage"] < free["coverage"] - 0.1 and capped["precision"] >= 0.95


def test_an_agreement_bounded_below_keeps_the_shown_labels_that_unbounded_agreement_would_withdraw():
    """The window-focus case: both views name the same label on every event and every event
    is shown on arrival, but a quarter are unsure at the end and mostly wrong. Keeping every
    agreeing final label misses the precision target (0.8), so before the bound the final
    label alone decided and the half-sure quarter, right 90% of the time, was withdrawn at
    the end: half of all events revised. Keeping agreeing labels down to ``threshold - m``
    keeps them and withdraws only the unsure: a quarter revised, still at the target; and the
    rule the worker and ``predict`` apply (``covered_by``) covers the same events."""
    from trainer.artifacts import covered_by, softmax_t
    rng = np.random.default_rng(3)
    n, classes = 4000, 4
    y = rng.integers(0, classes, n)
    group = rng.choice(3, n, p=[0.5, 0.25, 0.25])                     # sure, half-sure, unsure
    right = np.select([group == 0, group == 1], [True, rng.random(n) < 0.9], rng.random(n) < 0.3)
    named = np.where(right, y, (y + 1 + rng.integers(0, classes - 1, n)) % classes)
    final = np.zeros((n, classes))
    final[np.arange(n), named] = np.select([group == 0, group == 1], [8.0, 4.0], 1.0)
    first = np.zeros((n, classes))
    first[np.arange(n), named] = 8.0                                  # every event shown, agreeing
    assert (named == y).mean() < 0.85                                 # unbounded agreement: imprecise
    got = _policy(first, final, y, 0.08)
    assert got["agreement"] is True and got["agreement_margin"] is not None
    assert got["precision"] >= 0.95 and got["coverage"] == pytest.approx(0.75, abs=0.03)
    assert got["revised_share"] == pytest.approx(0.25, abs=0.03)
    kept = covered_by(softmax_t(final, 1.0), got["threshold"], softmax_t(first, 1.0), got["first_threshold"],
                      got["agreement_margin"])
    assert kept.mean() == pytest.approx(got["coverage"]) and not kept[group == 2].any()


def test_when_agreeing_views_are_not_precise_the_final_label_alone_decides_still_once():
    """Both views name the same label everywhere, wrong on 40% of events: keeping what they
    agree on cannot reach the precision target, so the final label is kept at the plain
    threshold only, and the policy stays stable (one revision at most), not plain."""
    rng = np.random.default_rng(1)
    n, classes = 4000, 4
    y = rng.integers(0, classes, n)
    sure = rng.random(n) < 0.6
    named = np.where(sure, y, (y + 1) % classes)
    final = np.zeros((n, classes))
    final[np.arange(n), named] = np.where(sure, 8.0, 0.5)
    first = np.zeros((n, classes))
    first[np.arange(n), named] = rng.uniform(3.0, 8.0, n)
    got = _policy(first, final, y, 0.08)
    assert got["policy"] == "stable" and got["agreement"] is False
    assert got["threshold"] == 0.99 and got["precision"] >= 0.95


def test_auto_breaks_a_tie_of_perfect_candidates_towards_the_surer_one():
    """Both candidates label every held-out event right; the second is far surer, so a test
    event near a boundary is safer with it: the tie goes to the likelier combination."""
    from trainer.config import ModelConfig
    from trainer.train import Validated, choose_mixture
    y = np.arange(300) % 3
    def member(margin):
        z = np.zeros((len(y), 3))
        z[np.arange(len(y)), y] = margin
        return Validated(args=ModelConfig(n_labels=3, n_events=3, n_tokens=3, lookahead=None), cfg=from_dict({}),
                         logits=[z], labels=[y], depth_logits=None, epochs=1, best_epochs=[1])
    info = choose_mixture({"bilstm": member(0.5), "crf": member(6.0)}, ["a", "b", "c"])
    row = info["depths"][0]
    assert row["macro_f1"] == 1.0 and row["alone"]["bilstm"]["macro_f1"] == 1.0
    assert row["weights"]["crf"] > row["weights"]["bilstm"]


def test_auto_adds_a_label_bias_towards_a_rare_step_only_when_it_raises_held_out_macro_f1():
    """A step seen on 5% of the events, whose events both candidates score a little below the
    common step's: no weighting names it, so its F1 is 0. ``-tau * log(prior)`` lifts it over
    the common step's score there (not elsewhere): ``auto`` picks a tau > 0 and serves a
    Mixture with that bias. Where every step is already right, tau stays 0."""
    from trainer.config import ModelConfig
    from trainer.train import Validated, auto_table, choose_mixture, prior_bias
    n = 400
    y = np.where(np.arange(n) % 20 == 0, 2, np.arange(n) % 2)       # step 2: 5% of the events
    prior = np.bincount(y, minlength=3) / n

    def member(rare_margin):
        z = np.zeros((n, 3))
        z[np.arange(n), y] = 3.0
        rare = y == 2
        z[rare, 0] = 3.0 + rare_margin            # the rare step's events look like step 0
        z[rare, 2] = 3.0
        return Validated(args=ModelConfig(n_labels=3, n_events=3, n_tokens=3, lookahead=None), cfg=from_dict({}),
                         logits=[z], labels=[y], depth_logits=None, epochs=1, best_epochs=[1])
    taus = (0.0, 0.25, 0.5, 1.0)
    info = choose_mixture({"bilstm": member(0.5), "crf": member(0.8)}, ["a", "b", "c"], prior, taus)
    row = info["depths"][0]
    assert row["macro_f1_unbiased"] < 0.7 and row["macro_f1"] == 1.0 and row["tau"] > 0
    assert info["chosen"] == "mixture" and np.allclose(info["prior"], prior)
    assert f"prior bias tau {row['tau']:g}" in auto_table(info)[1]
    bias = prior_bias(np.asarray(info["prior"]), row["tau"])
    assert bias[2] > bias[0] and bias[2] > bias[1]                  # towards the rare step
    plain = choose_mixture({"bilstm": member(-1.0), "crf": member(-1.0)}, ["a", "b", "c"], prior, taus)
    assert plain["depths"][0]["tau"] == 0.0 and plain["prior"] is None and plain["chosen"] == "bilstm"


def test_bagged_weights_move_towards_a_candidate_that_wins_on_most_held_out_sessions():
    """One long held-out session favours the CRF, nine short ones the BiLSTM. Pooled over
    events the long one decides: the plain choice is the CRF-led weighting with the best
    log-likelihood, (0.4, 0.6). ``auto_bags`` resamples whole sessions; the resamples that miss
    the long one (about a third) pick BiLSTM-led weights, so the mean moves towards the
    BiLSTM, still short of handing it the labels; the same seed gives the same weights."""
    from trainer.config import ModelConfig
    from trainer.train import Validated, choose_mixture
    sizes = [600] + [30] * 9
    labels = [np.arange(n) % 3 for n in sizes]

    def member(right_on):
        logits = []
        for i, y in enumerate(labels):
            z = np.zeros((len(y), 3))
            z[np.arange(len(y)), y if i in right_on else (y + 1) % 3] = 5.0
            logits.append(z)
        return Validated(args=ModelConfig(n_labels=3, n_events=3, n_tokens=3, lookahead=None), cfg=from_dict({}),
                         logits=logits, labels=labels, depth_logits=None, epochs=1, best_epochs=[1],
                         depth_order=list(range(len(sizes))))
    results = {"bilstm": member(set(range(1, 10))), "crf": member({0})}
    plain = choose_mixture(results, ["a", "b", "c"])
    assert plain["depths"][0]["weights"] == {"bilstm": 0.4, "crf": 0.6}
    assert "bootstrap" not in plain["criterion"]
    info = choose_mixture(results, ["a", "b", "c"], bags=32, seed=3)
    row = info["depths"][0]
    w = row["weights"]
    assert 0.4 < w["bilstm"] < 0.5 < w["crf"] and abs(w["bilstm"] + w["crf"] - 1.0) < 1e-6
    assert row["macro_f1"] == plain["depths"][0]["macro_f1"]          # the CRF still labels
    assert info["members"] == ["bilstm", "crf"] and "32 bootstrap resamples" in info["criterion"]
    assert choose_mixture(results, ["a", "b", "c"], bags=32, seed=3)["depths"][0]["weights"] == w


def test_auto_averages_the_seeds_of_a_candidate_and_shares_its_weight():
    """Two seeds of one network, each wrong on a different third of the events: their mean
    log-probability is right everywhere, so the candidate is scored (and weighted) as their
    average, each seed carrying half of its weight into the served Mixture."""
    from trainer.config import ModelConfig
    from trainer.train import Validated, auto_table, choose_mixture
    y = np.arange(300) % 3
    idx = np.arange(len(y))

    def member(wrong):
        z = np.zeros((len(y), 3))
        z[idx, y] = 2.0
        z[wrong, (y[wrong] + 1) % 3] = 3.0        # a confident mistake on these events
        return Validated(args=ModelConfig(n_labels=3, n_events=3, n_tokens=3, lookahead=None), cfg=from_dict({}),
                         logits=[z], labels=[y], depth_logits=None, epochs=1, best_epochs=[1])
    crf = member(idx[idx % 2 == 0])               # wrong on half of them
    info = choose_mixture({"bilstm": member(idx[idx < 100]), "crf": crf, "bilstm.2": member(idx[idx >= 200])},
                          ["a", "b", "c"])
    row = info["depths"][0]
    assert row["alone"]["bilstm"]["macro_f1"] == 1.0 and row["alone"]["crf"]["macro_f1"] < 0.8
    assert row["weights"]["bilstm"] == row["weights"]["bilstm.2"] == 0.5 and row["weights"]["crf"] == 0.0
    assert info["members"] == ["bilstm", "bilstm.2"] and info["chosen"] == "mixture"
    assert info["candidates"]["bilstm"]["seeds"] == 2 and set(info["candidates"]) == {"bilstm", "crf"}
    assert "bilstm x2 seeds" in auto_table(info)[0] and "1.0 bilstm" in auto_table(info)[1]


def test_auto_combines_three_candidates_when_each_covers_the_others_mistakes():
    """Three candidates, each confidently wrong on a different third of the events and right
    elsewhere: a mistake outweighs one right vote (so no pair is right everywhere) but not
    two (so all three, no weight above 4/9, are), and ``auto`` keeps all three."""
    from trainer.config import ModelConfig
    from trainer.train import Validated, auto_table, choose_mixture
    y = np.arange(300) % 3
    idx = np.arange(len(y))

    def member(wrong):
        z = np.zeros((len(y), 3))
        z[idx, y] = 2.0
        z[wrong, (y[wrong] + 1) % 3] = 4.5
        return Validated(args=ModelConfig(n_labels=3, n_events=3, n_tokens=3, lookahead=None), cfg=from_dict({}),
                         logits=[z], labels=[y], depth_logits=None, epochs=1, best_epochs=[1])
    info = choose_mixture({"bilstm": member(idx[idx < 100]), "crf": member(idx[(idx >= 100) & (idx < 200)]),
                           "tcn": member(idx[idx >= 200])}, ["a", "b", "c"])
    row = info["depths"][0]
    assert all(row["alone"][a]["macro_f1"] < 0.8 for a in ("bilstm", "crf", "tcn"))
    assert row["macro_f1"] == 1.0 and all(row["weights"][a] > 0 for a in ("bilstm", "crf", "tcn"))
    assert info["members"] == ["bilstm", "crf", "tcn"] and info["chosen"] == "mixture"
    assert "tcn" in auto_table(info)[1]


def test_a_network_trained_with_two_seeds_is_served_as_their_mixture(tmp_path):
    """``train.ensemble_seeds: 2``: two BiLSTMs from different seeds (different weights),
    saved as one Mixture that streams exactly like its offline forward pass."""
    import json

    from tagger.cli import main
    from tests.helpers import make_log, train_tiny
    from trainer.artifacts import load_artifact
    data = make_log(tmp_path, 60, 5)
    out = train_tiny(data, tmp_path / "m", model={"arch": "bilstm"}, train={"epochs": 2, "ensemble_seeds": 2})
    loaded = load_artifact(out)
    members = loaded.model.members
    assert len(members) == 2
    w0, w1 = (next(m.parameters()).detach() for m in members)
    assert not np.allclose(w0.numpy(), w1.numpy())
    assert json.loads((out / "metrics.json").read_text())["auto"]["members"] == ["bilstm", "bilstm.2"]
    test = make_log(tmp_path, 10, 6)
    assert main(["-q", "evaluate", "--model", str(out), "--data", str(test), "--json", str(tmp_path / "e.json"),
                 "--streaming"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["streaming"]["final_equals_offline"] == 1.0


def test_a_network_reading_less_far_than_the_lookahead_is_served_beside_the_crfs(tmp_path):
    """``model.network_lookahead: 2`` under ``lookahead: 4``: ``auto``'s network reads 2 later
    events, its CRF members 4. The served mixture's finals come after 4, calibrated at every
    depth 0..4, and equal the offline labels on every event when replayed live."""
    import json

    from tagger.cli import main
    from tests.helpers import make_log, train_tiny
    from trainer.artifacts import load_artifact
    data = make_log(tmp_path, 60, 5)
    out = train_tiny(data, tmp_path / "m", model={"arch": "auto", "auto_archs": ["bilstm", "crf"], "lookahead": 4,
                                                  "network_lookahead": 2}, train={"epochs": 2})
    loaded = load_artifact(out)
    reads = {m.args.arch: m.args.lookahead for m in loaded.model.members}
    assert reads == {"bilstm": 2, "crf": 4}, json.loads((out / "metrics.json").read_text())["auto"]["depths"]
    assert loaded.lookahead == 4 and len(loaded.prefix_temperatures) == 5
    test = make_log(tmp_path, 10, 6)
    assert main(["-q", "evaluate", "--model", str(out), "--data", str(test), "--json", str(tmp_path / "e.json"),
                 "--streaming"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["streaming"]["final_equals_offline"] == 1.0


def test_a_causal_network_candidate_is_served_for_arrival_labels(tmp_path):
    """``auto_archs: [bilstm, crf, bilstm_causal]``: the causal BiLSTM is trained reading no
    later event and weighed on arrival only; the served mixture keeps its labels until the
    others' finals and still equals the offline labels on every event when replayed live."""
    import json

    from tagger.cli import main
    from tests.helpers import make_log, train_tiny
    from trainer.artifacts import load_artifact
    from trainer.config import candidate_of
    data = make_log(tmp_path, 60, 5)
    out = train_tiny(data, tmp_path / "m", model={"arch": "auto", "lookahead": 3,
                                                  "auto_archs": ["bilstm", "crf", "bilstm_causal"]})
    depths = json.loads((out / "metrics.json").read_text())["auto"]["depths"]
    assert [d["k"] for d in depths] == [0, 1, 2, 3]
    assert depths[0]["weights"]["bilstm_causal"] > 0, depths[0]
    assert all(d["weights"]["bilstm_causal"] == 0.0 for d in depths[1:])
    loaded = load_artifact(out)
    reads = {candidate_of(m.args.to_args()): m.args.lookahead for m in loaded.model.members}
    assert reads["bilstm_causal"] == 0 and loaded.lookahead == 3
    test = make_log(tmp_path, 10, 6)
    assert main(["-q", "evaluate", "--model", str(out), "--data", str(test), "--json", str(tmp_path / "e.json"),
                 "--streaming"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["streaming"]["final_equals_offline"] == 1.0


def test_a_network_reading_no_later_event_is_weighed_for_arrival_labels_only():
    """``bilstm_causal`` (lookahead 0) beside a BiLSTM and a CRF reading one later event: even
    where it is the best alone at every depth, ``auto`` gives it weight on arrival (k = 0)
    and none once a label has seen a later event, so the final labels are those of the
    other members (the same as without it)."""
    from trainer.config import ModelConfig
    from trainer.train import Validated, choose_mixture
    rng = np.random.default_rng(0)
    lengths = [40, 25, 35]
    labels = [rng.integers(0, 3, n) for n in lengths]
    order = [1, 2, 0]

    def member(arch, L, sure):
        full = [rng.normal(size=(n, 3)) + sure * np.eye(3)[y] for n, y in zip(lengths, labels)]
        z = [np.concatenate([full[i][:max(0, lengths[i] - k)] for i in order]) for k in range(L + 1)]
        y = [np.concatenate([labels[i][:max(0, lengths[i] - k)] for i in order]) for k in range(L + 1)]
        return Validated(args=ModelConfig(arch=arch, n_labels=3, n_events=3, n_tokens=3, lookahead=L),
                         cfg=from_dict({}), logits=full, labels=labels, depth_logits=(z, y), epochs=1,
                         best_epochs=[1], depth_order=order)
    results = {"bilstm": member("bilstm", 1, 1.0), "crf": member("crf", 1, 1.0),
               "bilstm_causal": member("bilstm", 0, 6.0)}
    info = choose_mixture(results, ["a", "b", "c"])
    arrive, final = info["depths"]
    assert arrive["alone"]["bilstm_causal"]["macro_f1"] == final["alone"]["bilstm_causal"]["macro_f1"] == 1.0
    assert arrive["weights"]["bilstm_causal"] > 0 and final["weights"]["bilstm_causal"] == 0.0
    without = choose_mixture({a: results[a] for a in ("bilstm", "crf")}, ["a", "b", "c"])
    assert {a: final["weights"][a] for a in ("bilstm", "crf")} == without["depths"][1]["weights"]
    assert "bilstm_causal" in info["members"]


def test_auto_lines_up_members_that_read_different_spans():
    """A network reading 1 later event beside a CRF reading 2 (``model.network_lookahead``):
    at depth 2 the network's rows are its final ones, less each session's last event, so they
    line up with the CRF's, and ``auto`` weighs depths 0..2."""
    from trainer.config import ModelConfig
    from trainer.train import Validated, choose_mixture
    rng = np.random.default_rng(0)
    lengths = [5, 1, 4, 6]
    labels = [rng.integers(0, 3, n) for n in lengths]
    order = [2, 0, 3, 1]                          # held-out blocks in fold order, not session order

    def member(L):
        full = [rng.normal(size=(n, 3)) for n in lengths]
        z = [np.concatenate([full[i][:max(0, lengths[i] - k)] + k for i in order]) for k in range(L + 1)]
        y = [np.concatenate([labels[i][:max(0, lengths[i] - k)] for i in order]) for k in range(L + 1)]
        return Validated(args=ModelConfig(n_labels=3, n_events=3, n_tokens=3, lookahead=L), cfg=from_dict({}),
                         logits=full, labels=labels, depth_logits=(z, y), epochs=1, best_epochs=[1],
                         depth_order=order)
    net, crf = member(1), member(2)
    z2, y2 = net.at_depth(2)
    assert np.array_equal(y2, crf.at_depth(2)[1])
    assert np.array_equal(y2, np.concatenate([labels[i][:max(0, lengths[i] - 2)] for i in order]))
    assert np.allclose(z2, np.concatenate([net.logits[i][:max(0, lengths[i] - 2)] + 1 for i in order]))  # depth-1 rows
    # each row's session (auto_bags resamples sessions): the block order, beyond L too
    for k in (0, 1, 2):
        assert np.array_equal(net.sessions_at(k), np.repeat(order, [max(0, lengths[i] - k) for i in order]))
        assert len(net.sessions_at(k)) == len(net.at_depth(k)[1])
    assert np.array_equal(net.sessions_at(None), np.repeat(np.arange(4), lengths))
    info = choose_mixture({"bilstm": net, "crf": crf}, ["a", "b", "c"])
    assert [r["k"] for r in info["depths"]] == [0, 1, 2]
    bagged = choose_mixture({"bilstm": net, "crf": crf}, ["a", "b", "c"], bags=8)
    assert [r["k"] for r in bagged["depths"]] == [0, 1, 2]
    assert all(abs(sum(r["weights"].values()) - 1.0) < 1e-6 for r in bagged["depths"])


def _meals(path, days: int, seed: int, hours_tell: bool = True):
    """Kitchen sessions: the same sensor events, at the same pace, in the morning (breakfast)
    and in the evening (dinner); only the hour tells the two apart. With ``hours_tell=False``
    the other way round: each meal has a sensor of its own (toaster, oven) and is cooked at
    either hour. Written as the other tests write their logs (records, then
    ``DataFrame.to_csv``)."""
    import random

    import pandas as pd
    rng = random.Random(seed)
    steps = ["Fridge opened", "Cupboard opened", "Stove on", "Stove off", "Dishwasher opened"]
    records = []
    for d in range(days):
        for hour, meal in ((7, "Breakfast"), (19, "Dinner")):
            minute = rng.randrange(0, 30)
            names = rng.sample(steps, 4)
            if not hours_tell:
                meal = rng.choice(["Breakfast", "Dinner"])
                names[0] = "Toaster on" if meal == "Breakfast" else "Oven on"
            records += [{"session_id": f"{seed}-{d}-{hour}", "event_name": name, "step_name": meal,
                         "timestamp": f"2024-03-{1 + d % 28:02d}T{hour:02d}:{minute + 2 * i:02d}:00"}
                        for i, name in enumerate(names)]
    pd.DataFrame(records).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("on", [True, False])
def test_a_step_that_only_the_hour_of_the_day_tells_apart_is_learned_from_it(tmp_path, on):
    """Breakfast and dinner are the same kitchen events; with ``data.time_of_day`` a model
    labels them by the part of the day, without it (the default) it can only guess."""
    import json

    from tagger.cli import main
    from tests.helpers import TINY
    from trainer.train import train
    out = tmp_path / "m"
    cfg = from_dict(TINY).replace(model={"arch": "crf"}, data={"time_of_day": on})
    train(_meals(tmp_path / "train.csv", 24, 0), out, cfg, progress=False, echo=lambda *_: None)
    test = _meals(tmp_path / "test.csv", 8, 1)
    assert main(["-q", "evaluate", "--model", str(out), "--data", str(test), "--json", str(tmp_path / "e.json")]) == 0
    acc = json.loads((tmp_path / "e.json").read_text())["offline"]["token_accuracy"]
    if on:
        assert acc == 1.0
    else:
        assert acc <= 0.75


def test_with_the_time_of_day_on_auto_only_the_clock_crf_reads_it_and_auto_weighs_it(tmp_path):
    """``data.time_of_day: auto``: the part of the day is read by one more candidate of
    ``auto``, ``crf_clock``, and by no other model. On the meals log only it can tell
    breakfast from dinner, so auto gives it weight at every depth and the served mixture
    labels the meals; the network member's labels do not move when the clock is removed from
    its input, and the replay's final labels equal the offline ones."""
    import json

    from tagger.cli import main
    from tests.helpers import TINY
    from trainer.artifacts import load_artifact
    from trainer.loading import read_events
    from trainer.train import train
    out = tmp_path / "m"
    cfg = from_dict(TINY).replace(model={"arch": "auto", "auto_archs": ["bilstm", "crf"]},
                                  data={"time_of_day": "auto"}, train={"epochs": 3})
    train(_meals(tmp_path / "train.csv", 24, 0), out, cfg, progress=False, echo=lambda *_: None)
    info = json.loads((out / "metrics.json").read_text())["auto"]
    assert set(info["candidates"]) == {"bilstm", "crf", "crf_clock"}
    assert info["clock"]["kept"] and info["clock"]["crf_clock"] == 1.0 > info["clock"]["crf"]
    for row in info["depths"]:
        assert row["alone"]["crf_clock"]["macro_f1"] == 1.0, row
        assert row["alone"]["bilstm"]["macro_f1"] < 0.8 and row["alone"]["crf"]["macro_f1"] < 0.8, row
        assert row["weights"]["crf_clock"] > 0, row
    test = _meals(tmp_path / "test.csv", 8, 1)
    assert main(["-q", "evaluate", "--model", str(out), "--data", str(test), "--json", str(tmp_path / "e.json"),
                 "--streaming"]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["offline"]["token_accuracy"] == 1.0
    assert report["streaming"]["final_equals_offline"] == 1.0
    loaded = load_artifact(out)
    clock = loaded.encoder.clock_ids()
    assert len(clock) == 2                                 # dp=1 (7 h) and dp=4 (19 h)
    members = getattr(loaded.model, "members", [loaded.model])
    readers = [m for m in members if m.args.read_clock]
    assert len(readers) == 1 and readers[0].args.lex_ignore == () and readers[0].wide.table[clock].abs().sum() > 0
    frame, _ = read_events(test)
    _, sessions = loaded.encoder.transform_frame(frame, base_dir=loaded.base_dir)
    for m in members:
        if not m.args.read_clock:
            assert sorted(m.args.lex_ignore) == sorted(clock.tolist())
            _assert_blind_to(m, sessions, clock)


def test_with_the_time_of_day_on_auto_a_clock_that_tells_nothing_changes_nothing(tmp_path):
    """Meals told by their own sensor, each cooked at either hour: the causal CRF with the
    time of day is no better alone on held-out sessions than the one without, so ``auto``
    leaves it out (no weight at any depth, not the small weights a grid search over one more
    candidate can find by chance) and says so in the training log. What it serves then labels
    every event with the same probabilities as the model trained with the setting off."""
    import json

    from tests.helpers import TINY
    from trainer.artifacts import load_artifact
    from trainer.loading import read_events
    from trainer.train import train
    data = _meals(tmp_path / "train.csv", 24, 0, hours_tell=False)
    frame, _ = read_events(_meals(tmp_path / "test.csv", 8, 1, hours_tell=False))
    probs, lines = {}, []
    for setting in ("auto", False):
        out = tmp_path / f"m_{setting}"
        cfg = from_dict(TINY).replace(model={"arch": "auto", "auto_archs": ["bilstm", "crf"]},
                                      data={"time_of_day": setting}, train={"epochs": 3})
        train(data, out, cfg, progress=False, echo=lines.append)
        lm = load_artifact(out)
        probs[setting] = lm.predict_decisions(frame)[1]
        if setting == "auto":
            info = json.loads((out / "metrics.json").read_text())["auto"]
            assert not info["clock"]["kept"] and info["clock"]["crf_clock"] <= info["clock"]["crf"]
            assert "crf_clock" not in info["candidates"] and "crf_clock" not in info["members"]
            assert any("crf_clock alone" in line and "left out" in line for line in lines), lines
            members = getattr(lm.model, "members", None) or [lm.model]
            assert not any(m.args.read_clock for m in members) and len(lm.encoder.clock_ids()) == 2
    for a, b in zip(probs["auto"], probs[False]):
        np.testing.assert_array_equal(a, b)


def _assert_blind_to(model, sessions, ids):
    """The model's labels are the same with the lexical ids ``ids`` removed from its input."""
    from trainer.crf import without_lex
    from trainer.model import session_logits
    for a, b in zip(session_logits(model, sessions), session_logits(model, without_lex(sessions, ids))):
        np.testing.assert_array_equal(a, b)


def test_with_the_time_of_day_on_auto_a_single_network_does_not_read_it(tmp_path):
    """``data.time_of_day: auto`` with one architecture (no ``auto`` to weigh the clock
    candidate): the network ignores the part of the day in training and live alike, so on
    the meals log it can only guess, as with the setting off."""
    import json

    from tagger.cli import main
    from tests.helpers import TINY
    from trainer.artifacts import load_artifact
    from trainer.loading import read_events
    from trainer.train import train
    out = tmp_path / "m"
    cfg = from_dict(TINY).replace(model={"arch": "bilstm"}, data={"time_of_day": "auto"}, train={"epochs": 3})
    train(_meals(tmp_path / "train.csv", 24, 0), out, cfg, progress=False, echo=lambda *_: None)
    test = _meals(tmp_path / "test.csv", 8, 1)
    assert main(["-q", "evaluate", "--model", str(out), "--data", str(test), "--json", str(tmp_path / "e.json"),
                 "--streaming"]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["offline"]["token_accuracy"] <= 0.75
    assert report["streaming"]["final_equals_offline"] == 1.0
    loaded = load_artifact(out)
    clock = loaded.encoder.clock_ids()
    assert len(clock) == 2 and sorted(loaded.model.args.lex_ignore) == sorted(clock.tolist())
    frame, _ = read_events(test)
    _assert_blind_to(loaded.model, loaded.encoder.transform_frame(frame, base_dir=loaded.base_dir)[1], clock)


def test_auto_takes_the_crf_stickiness_whose_mixture_scores_best_on_held_out_final_labels():
    """``train.auto_crf_sticky``: each delta's mixture is chosen again on the CRF candidate's
    held-out logits at that delta, and the delta whose final labels score best is kept (the
    smallest of two that tie); where no delta helps, the CRF's own transitions stay."""
    from trainer.config import ModelConfig
    from trainer.train import Validated, choose_mixture, choose_sticky
    runs = np.repeat(np.arange(30) % 3, 10)                 # runs of 10 events
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(len(runs)) < 0.3, (runs + 1) % 3, runs)   # a CRF that breaks runs up

    def member(pred, arch="crf"):
        z = np.zeros((len(runs), 3))
        z[np.arange(len(runs)), pred] = 2.0
        return Validated(args=ModelConfig(arch=arch, n_labels=3, n_events=3, n_tokens=3, lookahead=None),
                         cfg=from_dict({}), logits=[z], labels=[runs], depth_logits=None, epochs=1, best_epochs=[1])

    def choose(rs):
        return choose_mixture(rs, ["a", "b", "c"])

    crf = member(noisy)
    crf.sticky = {2.0: member(runs), 4.0: member(runs)}     # stickier: the runs mended, at 2 and 4 alike
    results = {"bilstm": member(noisy, "bilstm"), "crf": crf}
    chosen, info = choose_sticky(results, choose(results), choose, [0.0, 2.0, 4.0])
    assert info["crf_sticky"]["delta"] == 2.0
    assert set(info["crf_sticky"]["final"]) == {"0", "2", "4"}
    assert info["crf_sticky"]["final"]["2"]["macro_f1"] == 1.0 > info["crf_sticky"]["final"]["0"]["macro_f1"]
    assert chosen["crf"] is crf.sticky[2.0] and chosen["bilstm"] is results["bilstm"]
    assert info["depths"][-1]["weights"]["crf"] > 0

    crf.sticky = {2.0: member((runs + 1) % 3)}              # stickier and wrong: left alone
    chosen, info = choose_sticky(results, choose(results), choose, [0.0, 2.0])
    assert info["crf_sticky"]["delta"] == 0.0 and chosen["crf"] is crf


def test_a_stickier_crf_member_is_served_with_exactly_the_delta_auto_chose(tmp_path):
    """Trained with ``train.auto_crf_sticky: [0, 3]``, the served CRF member's transitions are
    the same CRF's (``arch: crf``, same sessions, CRFsuite is deterministic) plus the chosen
    delta on the diagonal and nothing else; the delta is the one whose held-out final labels
    scored best, and the live replay's final labels still equal the offline ones."""
    import json

    from tagger.cli import main
    from tests.helpers import TINY, make_log
    from trainer.artifacts import load_artifact
    from trainer.train import train
    log = make_log(tmp_path, 40, 3)
    base = from_dict(TINY).replace(data={"time_of_day": False}, train={"epochs": 3})
    train(log, tmp_path / "auto", base.replace(model={"arch": "auto", "auto_archs": ["bilstm", "crf"]},
                                               train={"auto_crf_sticky": [0.0, 3.0]}),
          progress=False, echo=lambda *_: None)
    train(log, tmp_path / "crf", base.replace(model={"arch": "crf"}), progress=False, echo=lambda *_: None)
    info = json.loads((tmp_path / "auto" / "metrics.json").read_text())["auto"]
    sticky = info["crf_sticky"]
    assert set(sticky["final"]) == {"0", "3"}
    scores = {float(d): (r["macro_f1"], r["accuracy"]) for d, r in sticky["final"].items()}
    assert sticky["delta"] == max(scores, key=lambda d: (*scores[d], -d))
    served = load_artifact(tmp_path / "auto").model
    members = [m for m in getattr(served, "members", [served]) if m.args.arch == "crf"]
    assert members, info["members"]
    own = load_artifact(tmp_path / "crf").model.crf.trans.detach()
    delta = sticky["delta"] * torch.eye(own.shape[0])
    assert torch.allclose(members[0].crf.trans.detach(), own + delta, atol=1e-6)
    test = make_log(tmp_path, 8, 11)
    assert main(["-q", "evaluate", "--model", str(tmp_path / "auto"), "--data", str(test),
                 "--json", str(tmp_path / "e.json"), "--streaming"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["streaming"]["final_equals_offline"] == 1.0
