"""Offline side of the tagger: loading, features, models, training, evaluation, artifacts.

`stream` imports the feature encoders and the model loader from here, so there is one
implementation of feature encoding and training and serving cannot drift apart. The arrow
goes one way: ``trainer`` never imports ``stream`` (the live replay behind
``evaluate --streaming`` and ``cv`` is passed in by ``tagger.cli``).
"""

__version__ = "0.1.0"
