"""Options around the encoders: the CRF output layer, history tokens, late fusion, the image
backbone from a local file, the group_id-only feature set, resampling and prefix-time
calibration. The contract suite (test_model_contract.py) covers the shapes and streaming
equivalence of every arch x fusion; these tests pin what each option promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import make_log, train_tiny
from tests.trainer.test_model_contract import make_args, session, stream_outputs
from trainer.artifacts import load_artifact, save_artifact
from trainer.config import DataConfig, from_dict
from trainer.errors import ConfigError
from trainer.features import EventContext, derive
from trainer.model import SmallCNN, Tagger, _Scaled, collate, crf_split


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory):
    return make_log(tmp_path_factory.mktemp("opts"), 120, 31, "train.csv")


def _random_crf(model):
    torch.nn.init.normal_(model.crf.trans, std=1.0)
    return model


@pytest.mark.parametrize("arch", ["bilstm", "transformer", "ht_transformer"])
@pytest.mark.parametrize("L", [0, 1, 3, 5])
def test_crf_streaming_equals_offline_with_real_transitions(arch, L):
    torch.manual_seed(1)
    model = _random_crf(Tagger(make_args(arch, "concat", lookahead=L, crf=True, context=4))).eval()
    s = session(17, 11)
    full, _ = model(collate([s]))
    assert torch.allclose(stream_outputs(model, s), full[0], atol=1e-4)


def test_crf_splits_the_lookahead_between_encoder_and_backward_messages():
    assert crf_split(4, False) == (4, 0)
    assert crf_split(4, True) == (2, 2)
    assert crf_split(5, True) == (3, 2)
    assert crf_split(0, True) == (0, 0)
    assert crf_split(None, True) == (None, None)


def test_crf_outputs_are_log_marginals_and_transitions_matter():
    torch.manual_seed(2)
    model = Tagger(make_args("bilstm", "concat", lookahead=4, crf=True)).eval()
    batch = collate([session(9, 3)])
    before, _ = model(batch)
    assert torch.allclose(before.exp().sum(-1), torch.ones(1, 9), atol=1e-5)
    with torch.no_grad():
        model.crf.trans[0, 1] = 5.0
    after, _ = model(batch)
    assert not torch.allclose(before, after)


def test_history_tokens_carry_information_beyond_the_context_window():
    """With context 2, event 10 cannot attend to event 1 directly; the history token can."""
    torch.manual_seed(3)
    args = make_args("ht_transformer", "concat", lookahead=1, context=2, history_every=4)
    model = Tagger(args).eval()
    torch.nn.init.normal_(model.encoder.hist_bias)
    s = session(12, 4)
    base, _ = model(collate([s]))
    far = session(12, 4)
    far.event = far.event.copy()
    far.event[1] = (far.event[1] + 7) % 20
    changed, _ = model(collate([far]))
    assert not torch.allclose(base[0, 10], changed[0, 10], atol=1e-6)
    plain = Tagger(make_args("transformer", "concat", lookahead=1, context=2)).eval()
    a, _ = plain(collate([s]))
    b, _ = plain(collate([far]))
    assert torch.allclose(a[0, 10], b[0, 10], atol=1e-6)


@pytest.mark.parametrize("every,L", [(2, 3), (3, 0), (1, 2)])
def test_history_tokens_stream_like_the_offline_pass(every, L):
    torch.manual_seed(4)
    model = Tagger(make_args("ht_transformer", "concat", lookahead=L, context=4, history_every=every)).eval()
    s = session(14, 5)
    full, _ = model(collate([s]))
    assert torch.allclose(stream_outputs(model, s), full[0], atol=1e-4)


def test_late_fusion_has_one_encoder_per_modality():
    model = Tagger(make_args("bilstm", "late"))
    assert len(model.extra_encoders) == 2  # text and image besides the tabular features
    no_extra = Tagger(make_args("bilstm", "late", text_dim=0, image_size=0))
    assert len(no_extra.extra_encoders) == 0


# ---- the image backbone from a local file ---------------------------------------------------

def _backbone_files(tmp_path):
    torch.manual_seed(5)
    cnn = SmallCNN(12)
    sd = tmp_path / "smallcnn_state.pt"
    torch.save(cnn.state_dict(), sd)
    ts = tmp_path / "backbone.ts"
    torch.jit.trace(_Scaled(cnn).eval(), torch.zeros(1, 3, 8, 8)).save(str(ts))
    return cnn, sd, ts


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_backbone_from_a_local_file_is_frozen_and_streams(kind, tmp_path):
    cnn, sd, ts = _backbone_files(tmp_path)
    path = sd if kind == "state_dict" else ts
    model = Tagger(make_args("bilstm", "concat", image_backbone=str(path)))
    frozen = {k: v.clone() for k, v in model.embed.image.net.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch, tgt = collate([session(6, 1), session(4, 2)], with_targets=True)
    model.train()
    _, loss = model(batch, tgt)
    loss.backward()
    opt.step()
    for k, v in model.embed.image.net.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    # the backbone computes what the file's network computes
    img = torch.randint(0, 255, (3, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model.embed.image.net(img.float() / 255), cnn.net(img.float() / 255), atol=1e-5)
    model.eval()
    s = session(9, 3)
    assert torch.allclose(stream_outputs(model, s), model(collate([s]))[0][0], atol=1e-4)


def test_artifact_keeps_its_own_copy_of_the_backbone(tiny_log, tmp_path):
    from trainer.features import FeatureEncoder
    from trainer.loading import read_events
    _, sd, _ = _backbone_files(tmp_path)
    model = Tagger(make_args("bilstm", "concat", image_backbone=str(sd))).eval()
    enc = FeatureEncoder.fit(read_events(tiny_log)[0], DataConfig())
    out = save_artifact(tmp_path / "art", model=model, encoder=enc, labels=[str(i) for i in range(5)],
                        temperature=1.0, threshold=0.5, calibration={}, metrics={}, training={}, config={})
    sd.unlink()  # serving must not need the original file
    lm = load_artifact(out)
    assert (out / "image_backbone.pt").exists()
    batch = collate([session(5, 2)])
    assert torch.allclose(lm.model(batch)[0], model(batch)[0], atol=1e-6)


def test_config_checks_the_backbone_and_feature_set():
    with pytest.raises(ConfigError, match="image_col"):
        from_dict({"data": {"image_backbone": "x.pt"}})
    with pytest.raises(ConfigError, match="group_id_only"):
        from_dict({"data": {"feature_set": "group_id_only", "text_features": ["text"]}})
    with pytest.raises(ConfigError, match="feature_set"):
        from_dict({"data": {"feature_set": "everything"}})
    cfg = from_dict({"model": {"arch": "ht_transformer", "fusion": "late", "crf_head": True},
                     "train": {"resample": True}})
    assert cfg.model.crf_head and cfg.train.resample


def test_missing_backbone_file_is_a_config_error(tmp_path):
    from trainer.fit import backbone_path
    cfg = from_dict({"data": {"image_col": "img", "image_backbone": str(tmp_path / "nope.pt")}})
    with pytest.raises(ConfigError, match="never downloaded"):
        backbone_path(cfg)


# ---- features --------------------------------------------------------------------------------

def test_group_id_only_sees_nothing_but_the_group():
    data = DataConfig(feature_set="group_id_only")
    a = {"event_name": "Read: 4214758435 . A226 . in sharepoint", "group_id": "g1", "_ts": 10.0}
    b = {"event_name": "Write: Komax in Excel", "group_id": "g1", "_ts": 99.0}
    c = {"event_name": "Read: 4214758435 . A226 . in sharepoint", "group_id": "g2", "_ts": 10.0}
    da, _ = derive(a, EventContext(), data, ["group_id", "target_app"])
    db, _ = derive(b, EventContext(), data, ["group_id", "target_app"])
    dc, _ = derive(c, EventContext(), data, ["group_id", "target_app"])
    assert da == db
    assert da != dc


# ---- training options --------------------------------------------------------------------------

def test_prefix_calibration_is_stored_and_used_for_labels_before_finality(tiny_log, tmp_path):
    out = train_tiny(tiny_log, tmp_path / "m", train={"epochs": 2, "resample": True})
    lm = load_artifact(out)
    L = lm.lookahead
    cal = lm.manifest["calibration"]
    assert len(cal["prefix_temperatures"]) == len(cal["prefix_thresholds"]) == L + 1
    # depth L is the final decision: it keeps the full-lookahead calibration
    assert cal["prefix_temperatures"][L] == pytest.approx(lm.temperature)
    assert lm.prefix_threshold(L) == pytest.approx(lm.threshold)
    assert lm.prefix_threshold(L + 3) == pytest.approx(lm.threshold)
    # rows of one step output are calibrated by their own depth (oldest row: k = v - 1)
    z = np.random.default_rng(0).normal(size=(L + 1, len(lm.labels)))
    probs = lm.prefix_probs(torch.tensor(z))
    from trainer.artifacts import softmax_t
    for j in range(L + 1):
        assert np.allclose(probs[j], softmax_t(z[j], lm.prefix_temperatures[L - j]))


def test_old_artifacts_without_prefix_calibration_fall_back(tiny_log, tmp_path):
    out = train_tiny(tiny_log, tmp_path / "m", train={"epochs": 1, "prefix_calibration": False})
    lm = load_artifact(out)
    assert "prefix_temperatures" not in lm.manifest["calibration"]
    assert lm.prefix_temperatures == [lm.temperature] * (lm.lookahead + 1)
    assert lm.prefix_threshold(0) == lm.threshold


def test_prefix_logits_at_full_depth_are_the_offline_logits(tiny_log, tmp_path):
    from trainer.features import LabelMap
    from trainer.loading import read_events
    from trainer.model import session_logits
    from trainer.train import prefix_logits
    out = train_tiny(tiny_log, tmp_path / "m", model={"arch": "ht_transformer", "crf_head": True,
                                                      "history_every": 4},
                     train={"epochs": 1})
    lm = load_artifact(out)
    frame, _ = read_events(tiny_log)
    frame = frame[frame["session_id"].isin(set(frame["session_id"].unique()[:4]))]
    _, enc = lm.encoder.transform_frame(frame, LabelMap(lm.labels))
    L = lm.lookahead
    offline = session_logits(lm.model, enc, "cpu")
    for s, o in zip(enc, offline):
        z, y = prefix_logits(lm.model, [s], "cpu")
        assert len(z[0]) == len(s) and np.array_equal(y[0], s.labels)
        # depth-L rows are the offline logits of every event that has L successors
        assert np.allclose(z[L], o[:max(0, len(o) - L)], atol=1e-4)


def test_a_model_without_lexical_features_trains_and_labels(tiny_log, tmp_path):
    """``data.lexical: false`` (an ablation switch): the wide path (of the network and of the CRF) then reads numbers only."""
    from trainer.loading import read_events
    from trainer.config import from_dict
    from trainer.train import train
    from tests.helpers import TINY
    cfg = from_dict(TINY).replace(data={"lexical": False}, model={"arch": "auto"}, train={"epochs": 1})
    out = tmp_path / "m"
    train(tiny_log, out, cfg, progress=False, echo=lambda *_: None)
    lm = load_artifact(out)
    frame, _ = read_events(tiny_log)
    sids, probs = lm.predict_proba(frame)
    assert sum(len(p) for p in probs) == len(frame)
    assert all(np.allclose(p.sum(-1), 1.0, atol=1e-5) for p in probs)
