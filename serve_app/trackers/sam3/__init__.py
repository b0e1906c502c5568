"""The real SAM 3 tracker, `{"kind": "sam3"}`.

Modules: config (its typed config), loading (weights, vocabulary, device, build), compat (sam3
work-arounds), compile (compiled parts, warmed object buckets), frames (lazy model input),
session (one video through SAM 3), trim (bounded session memory), convert (outputs to
Detections), tracker (the stage itself, on trackers/worker.py's model thread). What tests and benchmarks measure on it is testkit/sam3.py. torch
and sam3 are imported only when a tracker is built.
"""
