"""What the tests and the benchmarks share: small real implementations and checks, never
shipped in the wheel (serve_app is).

- `doubles`: trackers with scripted misbehaviour, for the served graph;
- `video`: reading an answer's frames and judging them against the synthetic truth;
- `net`: a free local port;
- `sam3`: the SAM 3 tracker with random weights, pinned quantities and per-frame records.

Replicas import `testkit.doubles` by its import path: whoever starts a cluster for them puts
the checkout on every worker's PYTHONPATH.
"""
