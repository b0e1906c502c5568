"""SAM 3's overlay palette, as numbers, so serving never imports sam3.visualization_utils.

`sam3.visualization_utils.COLORS` is made at import time by a KMeans over 5,000 random LAB
samples after `np.random.seed(42)` (about 6 s, and it pulls in matplotlib, pandas and sklearn).
Its 128 RGB colours in [0, 1] are copied exactly into palette.json (package data);
tests/unit/test_composite.py checks them against the installed sam3. Object `i` is drawn in
`COLORS[i % 128]`.
"""

import json
from importlib import resources

import numpy as np

COLORS = np.array(json.loads(resources.files(__package__).joinpath("palette.json").read_text()), dtype=np.float64)
COLORS.setflags(write=False)
