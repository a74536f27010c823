"""The tagger: step labels for every desktop event, live and offline.

Three packages, one way round:

    tagger/    the ``tagger`` command (``tagger.cli``): the only module that knows both
               packages; it composes their subcommands and hands the trainer the live replay
    stream/    the live service (Faust worker, records, Redis session store, tagging, hot
               swap, metrics) and, in ``stream.tools``, the tools around it
    trainer/   everything about the model: features, networks, training, evaluation, artifacts

``stream`` imports ``trainer`` (one feature encoder, one model loader); ``trainer`` never
imports ``stream`` (``tests/test_layering.py`` checks it).
"""
