"""The live service: what ``tagger worker`` runs.

    app            the Faust app, its topics and the agent; ``WorkerService`` does the work
    records        the topic contracts in code (input events, label records, dead letters)
    tagging        ``LiveTagger``: sessions in memory, one cached model step per event
    revisions      when a label is shown, revised or withheld
    session_store  Redis (and its in-memory twin) behind a small interface; redis_client
    model_holder   hot swap: follows ``artifacts/current``, vets a new model
    metrics        the Prometheus bundle; settings (TAGGER_* environment); preflight (start-up
                   checks); errors (the stream exception tree); stopping (the worker class: a
                   bounded stop); cli (its ``tagger`` subcommands)
    tools/         what people and tests run around the service (stack, demo, bench, chaos,
                   publish, tail, the streaming replay); the service never imports them

``stream`` builds on ``trainer`` (one feature encoder, one model loader); ``trainer`` never
imports ``stream``.
"""
