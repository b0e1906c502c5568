"""The real SAM 3 tracker, `{"kind": "sam3"}`.

Modules: config (its typed config), loading (weights, vocabulary, device, build), compat (sam3
work-arounds), worker (the model-owner thread), frames (lazy model input), session (one video
through SAM 3), trim (bounded session memory), convert (outputs to Detections), tracker (the
stage itself). What tests and benchmarks measure on it is benchmarks/instrumented.py. torch
and sam3 are imported only when a tracker is built.
"""
