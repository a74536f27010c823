"""Offline side of the tagger: everything about the model, from an event log to an artifact.

`stream` imports the feature encoders and the model loader from here, so there is one
implementation of feature encoding and training and serving cannot drift apart.

Layout, one module per concept (each one's docstring says more):

    config.py      the typed, frozen YAML config; ModelConfig is also a checkpoint's model_args
    errors.py      the exception tree (TaggerError and its subclasses)
    loading.py     reading CSV/Parquet logs into one ordered frame; timestamps, event ids
    features.py    per-event features and the FeatureEncoder (shared with the live worker)
    model.py       the networks: embedder, fusion, encoders with bounded lookahead, the CRF
                   layer, Tagger, Mixture; one-step streaming (step) and session logits
    crf.py         model.arch crf: a CRF fitted by CRFsuite and served by the torch Tagger
    fit.py         fitting one model: chunking, class weights, the epoch loop, early stopping
    train.py       the `tagger train` pipeline: splits, validation plans, auto's mixture,
                   calibration and abstention, the artifact
    hpo.py         k-fold hyperparameter search (Optuna) over fit.py
    baseline.py    the classic labellers (logistic regression, CRFsuite CRF): the yardstick
    artifacts.py   the artifact folder: save, load (LoadedModel), verify, promote
    metrics.py     classification, selective-prediction and incremental metrics (pure numpy)
    evaluate.py    `tagger evaluate` and `tagger predict`
    cv.py          `tagger cv`: cross-validation by session, pooled over folds
    ablation.py    cv over logs and model variants, written to docs/ablation.md (run it as
                   `python -m tagger.ablation`, which passes the live replay in)
    report.py      plots and the text summary of a metrics dict
    generate.py    the synthetic log generator (`tagger generate`); window_focus.yaml is the
                   window-focus profile's catalogue of windows and activities
    cli.py         the trainer's `tagger` subcommands (tagger.cli adds the live ones from stream.cli)
"""

__version__ = "0.1.0"
