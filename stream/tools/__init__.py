"""Tools around the live service: what people and tests run, never the worker itself.

    stack       the embedded local stack (tansu broker + Redis) behind `tagger stack`, the demo
                and the tests
    processes   the one worker launcher and the child-process helpers every tool shares
    publisher   `tagger publish`: replay a log into the events topic as desktop agents would
    tail        `tagger tail`: show label records as they arrive
    demo        `tagger demo`: the whole product on this machine, with a summary
    bench       `tagger bench` (and bench_apps, its bare Faust baselines)
    chaos       `tagger chaos`: faults injected into live workers, graded on what came out
    replay      the streaming evaluation (`tagger evaluate --streaming`, `tagger cv`): labelled
                sessions through the same LiveTagger the worker runs

A subpackage rather than a sibling top-level package: the tools are part of the live side
(they start its worker, read its settings and topics, and ship in the same distribution and
image), and DESIGN.md's top level stays ``stream/`` and ``trainer/``; what matters is the
direction, which tests/test_layering.py checks: tools import the service, never the reverse.
"""
