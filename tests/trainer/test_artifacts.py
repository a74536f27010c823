"""Artifacts written by earlier versions still load and predict exactly as they did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.artifacts import load_artifact
from trainer.config import ModelConfig
from trainer.errors import ArtifactError
from trainer.loading import read_events
from trainer.model import Tagger, build_model, checkpoint_args

# A tiny BiLSTM with the CRF output layer, trained and saved by the code before ModelConfig
# replaced ModelArgs (its manifest says "crf": true), with what that code predicted for
# sessions.csv: calibrated final and on-arrival probabilities and the covered events.
OLD = Path(__file__).parent.parent / "fixtures" / "artifact_v0_1"


def test_an_artifact_of_the_old_format_predicts_what_it_did():
    lm = load_artifact(OLD)
    assert json.loads((OLD / "manifest.json").read_text())["model_args"]["crf"] is True
    assert lm.model.args.crf_head and lm.model.crf is not None
    expected = json.loads((OLD / "expected.json").read_text())
    frame, _ = read_events(OLD / "sessions.csv")
    sids, probs, covered = lm.predict_decisions(frame)
    _, enc = lm.encoder.transform_frame(frame, base_dir=lm.base_dir)
    first = lm.arrival_probs(enc)
    assert [str(s) for s in sids] == expected["session_ids"]
    for got, want in zip(probs, expected["final_probs"]):
        np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)
    for got, want in zip(first, expected["arrival_probs"]):
        np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)
    assert [c.tolist() for c in covered] == expected["covered"]


def test_an_unknown_model_argument_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(OLD, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["model_args"]["hiden_dim"] = 8
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="hiden_dim"):
        load_artifact(bad)


# model_args as the first ModelArgs wrote them: no lexical/wide keys, no history_every,
# image_backbone or freeze_backbone, and the CRF layer under its old name
FIRST_FORMAT = {"n_labels": 4, "n_events": 12, "n_tokens": 20, "cat_sizes": [3, 5], "n_nums": 2,
                "text_dim": 0, "image_size": 0, "arch": "bilstm", "fusion": "concat", "lookahead": 2,
                "context": 8, "emb_event_dim": 8, "emb_token_dim": 4, "emb_cat_dim": 2, "num_proj_dim": 2,
                "text_proj_dim": 4, "image_proj_dim": 4, "hidden_dim": 8, "num_layers": 2, "nhead": 2,
                "ff_dim": 16, "dropout": 0.1, "crf": True}


def test_model_args_with_fewer_keys_build_the_network_they_described():
    args = ModelConfig.from_args(FIRST_FORMAT)
    assert args.crf_head and args.n_lex == 0 and args.history_every == 8
    names = {k: tuple(v.shape) for k, v in Tagger(args).state_dict().items()}
    assert "crf.trans" in names and not any(k.startswith("wide.") for k in names)
    # the old ModelArgs defaults fill keys a hand-made dict leaves out
    lean = {k: v for k, v in FIRST_FORMAT.items() if k not in ("hidden_dim", "num_layers")}
    assert ModelConfig.from_args(lean).hidden_dim == 128 and ModelConfig.from_args(lean).num_layers == 2
    with pytest.raises(Exception, match="n_labels"):
        ModelConfig.from_args({k: v for k, v in FIRST_FORMAT.items() if k != "n_labels"})


def test_a_mixture_of_old_members_builds_and_round_trips():
    torch.manual_seed(0)
    members = [dict(FIRST_FORMAT), {**FIRST_FORMAT, "crf": False}]
    d = {"arch": "mixture", "members": members, "depth_weights": [[0.5, 0.5]] * 3,
         "lookahead": 2, "n_labels": 4}
    model = build_model(checkpoint_args(d))
    assert [m.args.crf_head for m in model.members] == [True, False]
    again = build_model(checkpoint_args(model.args.to_args()))
    assert [m.args for m in again.members] == [m.args for m in model.members]
    with pytest.raises(Exception, match="extra"):
        checkpoint_args({**d, "extra": 1})
