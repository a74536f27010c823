"""Offline side of the tagger: loading, features, models, training, evaluation, artifacts.

`stream` imports the feature encoders and the model loader from here, so there is one
implementation of feature encoding and training and serving cannot drift apart.
"""

__version__ = "0.1.0"
