"""``python -m tagger.ablation``: ``trainer.ablation`` with the live replay passed in.

Each fold's first-label scores come from replaying it through the live tagger
(``stream.tools.replay``); ``trainer`` does not import ``stream``, so this entry point does.
See ``trainer.ablation`` for the options.
"""

from __future__ import annotations

import sys

from tagger.cli import streaming_replay
from trainer.ablation import main

if __name__ == "__main__":
    sys.exit(main(streaming=streaming_replay))
