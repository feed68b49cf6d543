"""What every benchmark script sets before it imports torch, transformers or ``train``.

Importing this module (the scripts' own folder is on ``sys.path`` when one runs as ``python scripts/X.py``):

* keeps Hugging Face offline and quiet (``OFFLINE``; values already set in the environment win), so a timing
  never includes a hub lookup or a progress bar;
* puts this checkout and ``scripts/`` first on ``sys.path``, so a script measures the code beside it, not an
  installed copy of the package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)
for _path in (REPO, REPO / "scripts"):  # scripts/ ends up first, as each script had it
    sys.path.insert(0, str(_path))
