"""`sam3-video batch MANIFEST --out DEST`: thousands of videos through the graph, resumable.

    manifest.py    what to run: one Item per input (JSONL, CSV, or an input glob)
    dest.py        where it goes: NAME.mp4 (+ NAME.objects.json), NAME.done.json, results.jsonl
    segmenters.py  what runs it: the deployed app's handle (a Ray driver), or one process
    run.py         the batch: bounded in flight, retries, progress, the closing table

A rerun skips every input whose `NAME.done.json` names the same input (size and fingerprint, or
content hash) and config, with its files whole; a stopped run leaves only hidden `.part` files,
which the next run removes. docs/design.md ("Batch") says why each choice was made.
"""
