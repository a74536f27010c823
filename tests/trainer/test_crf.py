"""The CRF architecture (``model.arch: crf``): CRFsuite's weights in the torch Tagger give
CRFsuite's own probabilities, and the model serves live like the networks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from tests.trainer.test_baseline import make_records
from trainer.artifacts import load_artifact
from trainer.config import from_dict
from trainer.crf import attributes, fit_crf
from trainer.features import FeatureEncoder, LabelMap
from trainer.loading import records_to_frame
from trainer.model import collate
from trainer.fit import model_args
from trainer.train import train


def encoded(records, encoder=None, labels=None):
    frame = records_to_frame(records, require_label=True)
    cfg = from_dict({})
    encoder = encoder or FeatureEncoder.fit(frame, cfg.data)
    labels = labels or LabelMap(sorted(frame["step_name"].unique()))
    return encoder, labels, encoder.transform_frame(frame, labels)[1]


def test_tagger_reproduces_crfsuite_marginals():
    """The weights copied out of CRFsuite give, at unbounded lookahead, exactly the
    marginals CRFsuite computes itself."""
    import sklearn_crfsuite
    enc, labels, sessions = encoded(make_records(30, seed=1))
    cfg = from_dict({"model": {"arch": "crf", "lookahead": None}})
    args = model_args(enc.spec(), len(labels), cfg)
    model, info = fit_crf(args, sessions)
    assert info["features"] > 0
    crf = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=0.05, c2=0.05, max_iterations=200,
                               all_possible_transitions=True)
    crf.fit([attributes(s, args.wide_past) for s in sessions],
            [[str(int(y)) for y in s.labels] for s in sessions])
    _, _, test = encoded(make_records(4, seed=2, prefix="t"), enc, labels)
    for s in test:
        with torch.no_grad():
            ours = torch.softmax(model(collate([s]))[0][0], -1).numpy()
        theirs = crf.predict_marginals_single(attributes(s, args.wide_past))
        ref = np.array([[m.get(str(c), 0.0) for c in range(len(labels))] for m in theirs])
        assert np.allclose(ours, ref, atol=1e-4)


@pytest.fixture(scope="module")
def crf_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("crf")
    pd.DataFrame(make_records(40, seed=3)).to_csv(d / "train.csv", index=False)
    pd.DataFrame(make_records(10, seed=4, prefix="t")).to_csv(d / "test.csv", index=False)
    train(d / "train.csv", d / "model", from_dict({"model": {"arch": "crf", "lookahead": 2}}),
          progress=False, echo=lambda *_: None)
    return d


def test_crf_is_served_live_with_final_labels_equal_to_offline(crf_model):
    """The marker's label depends on the event before it, which a causal CRF sees on arrival:
    its first labels are right, and its final labels are the offline ones."""
    from tagger.cli import streaming_replay
    from trainer.evaluate import evaluate
    lm = load_artifact(crf_model / "model")
    assert lm.kind == "neural" and lm.model.args.arch == "crf" and lm.lookahead == 2
    res = evaluate(crf_model / "model", crf_model / "test.csv", streaming=streaming_replay, plots=False)
    s = res["streaming"]
    assert s["final_equals_offline"] == 1.0
    assert res["offline"]["token_accuracy"] > 0.95
    assert s["first_top1_accuracy"] > 0.95


@pytest.mark.parametrize("on", [True, False])
def test_the_crf_can_leave_the_character_ngrams_out(tmp_path, on):
    """``model.crf_char_ngrams: false``: the CRF is fit without the character 4-grams, so its
    weights for them are zero and serving it every feature gives the labels it was fit for;
    its words and categorical values still carry weight."""
    pd.DataFrame(make_records(30, seed=5)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(make_records(6, seed=6, prefix="t")).to_csv(tmp_path / "test.csv", index=False)
    train(tmp_path / "train.csv", tmp_path / "model",
          from_dict({"model": {"arch": "crf", "lookahead": 2, "crf_char_ngrams": on}}),
          progress=False, echo=lambda *_: None)
    lm = load_artifact(tmp_path / "model")
    grams = lm.encoder.char_gram_ids().tolist()
    words = sorted(set(lm.encoder.vocabs["lex"].index.values()) - set(grams))
    assert grams and words
    table = lm.model.wide.table.detach()
    assert bool((table[grams] != 0).any()) is on
    assert (table[words] != 0).any()
    from tagger.cli import streaming_replay
    from trainer.evaluate import evaluate
    res = evaluate(tmp_path / "model", tmp_path / "test.csv", streaming=streaming_replay, plots=False)
    assert res["streaming"]["final_equals_offline"] == 1.0
    assert res["offline"]["token_accuracy"] > 0.95


def announced_records(n_sessions: int, seed: int, prefix: str = "s") -> list[dict]:
    """Sessions of 'open' events whose step only the event after them tells: an 'open'
    followed by 'confirm invoice' is part of invoicing, one followed by 'confirm order' of
    ordering; the confirmations are both 'confirming', so no label sequence tells them apart."""
    rng = np.random.default_rng(seed)
    records = []
    for s in range(n_sessions):
        ts = 1_700_000_000_000 + s * 10_000_000
        for _ in range(int(rng.integers(5, 10))):
            step = str(rng.choice(["invoicing", "ordering"]))
            for name, label in (("open record", step), (f"confirm {step.removesuffix('ing')}", "confirming")):
                records.append({"session_id": f"{prefix}{s}", "timestamp": ts, "event_name": name,
                                "step_name": label})
                ts += int(rng.integers(1000, 9000))
    return records


def test_auto_weighs_a_crf_that_reads_the_next_event_for_the_labels_that_have_seen_it(tmp_path):
    """``auto_archs: [crf, crf_ahead]``: the causal CRF cannot tell an 'open' on arrival, the
    one reading t+1 can once the next event is in. Auto gives the later depths to crf_ahead,
    so the final labels of the ambiguous events are right, and they equal offline when served."""
    from tagger.cli import streaming_replay
    from trainer.evaluate import evaluate
    pd.DataFrame(announced_records(24, seed=1)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(announced_records(6, seed=2, prefix="t")).to_csv(tmp_path / "test.csv", index=False)
    metrics = train(tmp_path / "train.csv", tmp_path / "model",
                    from_dict({"model": {"arch": "auto", "auto_archs": ["crf", "crf_ahead"], "lookahead": 2},
                               "train": {"val_folds": 2}}), progress=False, echo=lambda *_: None)
    depths = metrics["auto"]["depths"]
    assert [r["k"] for r in depths] == [0, 1, 2]
    assert all(r["weights"]["crf_ahead"] > 0.5 for r in depths[1:])
    assert depths[-1]["alone"]["crf_ahead"]["macro_f1"] > depths[-1]["alone"]["crf"]["macro_f1"] + 0.2
    lm = load_artifact(tmp_path / "model")
    ahead = [m for m in lm.model.members if m.args.crf_future == 1]
    assert len(ahead) == 1 and ahead[0].args.arch == "crf" and ahead[0].wide.F == 1
    res = evaluate(tmp_path / "model", tmp_path / "test.csv", streaming=streaming_replay, plots=False)
    assert res["offline"]["token_accuracy"] == 1.0
    assert res["streaming"]["final_equals_offline"] == 1.0


def test_auto_names_the_candidates_it_knows():
    from trainer.errors import ConfigError
    with pytest.raises(ConfigError, match="'crf_later' is not one of .*'crf_ahead'"):
        from_dict({"model": {"auto_archs": ["crf", "crf_later"]}})
    with pytest.raises(ConfigError, match="model.crf_ahead: must be >= 1"):
        from_dict({"model": {"crf_ahead": 0}})
    assert from_dict({"model": {"crf_ahead": 2}}).model.candidate("crf_ahead") == {"arch": "crf", "crf_future": 2}
    # crf_aheadN: a CRF that reads the next N events, beside the others
    cfg = from_dict({"model": {"auto_archs": ["crf", "crf_ahead", "crf_ahead2"]}}).model
    assert cfg.candidate("crf_ahead2") == {"arch": "crf", "crf_future": 2}
    assert cfg.candidate("crf_ahead") == {"arch": "crf", "crf_future": 1}
    # and back: a trained member's args name the candidate it was made from (the bench's line)
    from trainer.config import candidate_of
    for name in cfg.auto_archs:
        member = dataclasses.replace(cfg, **cfg.candidate(name)).to_args()
        assert candidate_of(member) == name
    for bad in ("crf_ahead0", "crf_ahead-1", "crf_aheadx"):
        with pytest.raises(ConfigError, match=f"{bad!r} is not one of"):
            from_dict({"model": {"auto_archs": ["crf", bad]}})
