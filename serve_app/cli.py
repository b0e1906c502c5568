"""`sam3-video`: segment a video from the command line, or serve the graph.

    sam3-video segment IN.mp4 -o OUT.mp4 --prompt "fish"   # through the graph on an embedded Ray
    sam3-video segment ... --url http://host:8000          # through a running service
    sam3-video segment ... --local                         # every stage in this process, no Ray
    sam3-video serve [--address auto] [--port 8000]        # HTTP service on a local/joined Ray
    sam3-video batch MANIFEST --out DEST [--address auto]  # many videos, resumable (exit 1: some failed)
    sam3-video synth clip.mp4                              # a synthetic clip, for dry runs
    sam3-video check-config serve_config.yaml cluster.yaml # the deploy files, offline

Every failure ends in one line, `error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from pydantic import ValidationError

from serve_app.contract import JobConfig, parse_config
from serve_app.errors import ServiceError


class Refused(Exception):
    """A command line this program cannot act on; main prints it as one line."""


def _pairs(pairs: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs, values read as JSON where they parse (else as strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise Refused(f"{flag} {pair!r} must be KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _tracker(args: argparse.Namespace):
    from serve_app.trackers import KINDS, tracker_config

    try:
        return tracker_config(args.tracker, **_pairs(args.tracker_option, "--tracker-option"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p not in KINDS) or 'kind'}: {e['msg']}"
                             for e in exc.errors())
        raise Refused(f"--tracker {args.tracker}: {problems}") from None


def _config(args: argparse.Namespace) -> JobConfig:
    extensions: dict[str, Any] = {} if args.max_objects is None else {"max_objects": args.max_objects}
    if args.objects:
        extensions["outputs"] = ["video", "objects"]
    if len(args.prompt) > 1:  # one --prompt is the plain job; several are one pass over the video
        extensions["prompts"] = args.prompt
    boxes = [{"box": _box(b), "label": True} for b in args.box] + [{"box": _box(b), "label": False}
                                                                  for b in args.negative_box]
    if boxes:
        extensions["boxes"] = boxes
    if args.prompt_frame:
        extensions["prompt_frame"] = args.prompt_frame
    text = {"prompt": args.prompt[0]} if len(args.prompt) == 1 else {}
    return parse_config({**text, "mode": args.mode, "alpha": args.alpha,
                         "confidence_threshold": args.confidence_threshold, **extensions})


def _box(value: str) -> list[float]:
    try:
        box = [float(v) for v in value.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise Refused(f"box {value!r} is not X,Y,W,H (four numbers, in the video's pixels)")
    return box


def _app_args(args: argparse.Namespace, joining: bool) -> dict[str, Any]:
    from serve_app.trackers import preflight

    tracker = _tracker(args)
    if not joining:
        preflight(tracker)  # the replicas start on this machine: fail here, in one line
    app: dict[str, Any] = {"tracker": tracker.model_dump()}
    if not joining and tracker.num_gpus and not _has_cuda():
        app["tracker_num_gpus"] = 0  # the tracker runs on this machine's CPU
    app |= _pairs(getattr(args, "arg", []), "--arg")
    if not joining:  # the job store is on this machine: fail here, in one line
        from serve_app.app import AppArgs
        from serve_app.jobs.store import JobStore

        a = AppArgs.model_validate(app)
        JobStore(os.path.expanduser(a.job_store), a.job_db).engine.dispose()  # a check: no connections kept
    return app


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _segment(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    config = _config(args)
    if args.local:
        from serve_app.pipeline import run_local
        from serve_app.trackers import build, preflight

        tracker = _tracker(args)
        preflight(tracker)
        objects = _objects_path(args.output) if "objects" in config.outputs else None
        with tqdm(unit="frame", desc="segment", disable=args.quiet) as bar:
            timings = run_local(args.input, args.output, config, build(tracker), objects_path=objects,
                                progress=lambda done, total: _advance(bar, done, total))
        return _done(args, _summary(timings))
    from serve_app import client

    with open(args.input, "rb") as f:
        video = f.read()
    if args.url:  # the async API: a real per-frame progress bar, and no proxy timeout to meet
        with tqdm(unit="frame", desc=f"segment via {args.url}", disable=args.quiet) as bar:
            files, job = client.segment_via_url(args.url, video, config, token=os.environ.get("SAM3_VIDEO_TOKEN"),
                                                progress=lambda done, total: _advance(bar, done, total))
        mp4, summary = files["output.mp4"], f"job {job['id']}, {job['progress']['elapsed_s']} s"
        objects = files.get("objects.json")
    else:
        from serve_app.app import start_app

        app_args = _app_args(args, joining=False)
        with tqdm(total=1, desc="segment via embedded Ray", unit="job", disable=args.quiet) as bar:
            result = start_app(app_args).segment_result.remote(video, config).result()
            bar.update(1)
        mp4, summary, objects = result.mp4, _summary(result.timings), result.objects
    with open(args.output, "wb") as f:
        f.write(mp4)
    if objects is not None:
        with open(_objects_path(args.output), "wb") as f:
            f.write(objects)
    _done(args, summary)


def _advance(bar, done: int, total: int) -> None:
    bar.total = total
    bar.update(done - bar.n)


def _objects_path(output: str) -> str:
    return os.path.splitext(output)[0] + ".objects.json"


def _summary(timings) -> str:
    from serve_app.media import STAGES

    return ", ".join(f"{s} {getattr(timings, s + '_ms'):.0f} ms" for s in STAGES)


def _done(args: argparse.Namespace, summary: str) -> None:
    if not args.quiet:
        print(f"wrote {args.output}: {summary}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    import time

    from serve_app.app import start_app

    start_app(_app_args(args, joining=bool(args.address)), address=args.address, http=(args.host, args.port))
    # After ray.init: Ray's own SIGTERM handler exits at once, and a stop must let the replicas
    # hand their running async jobs back to the queue.
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"serving POST http://{args.host}:{args.port}/v2/job (Ctrl-C or SIGTERM stops)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _batch(args: argparse.Namespace) -> int:
    """Every input of MANIFEST into DEST; 0 when all are done or skipped, 1 when any failed,
    130 when stopped (a rerun finishes), 2 (main) when the batch cannot run."""
    from serve_app.batch.dest import Dest
    from serve_app.batch.manifest import load
    from serve_app.batch.run import Batch, summary
    from serve_app.batch.segmenters import HandleSegmenter, LocalSegmenter, connect

    if args.address and (args.tracker != "sam3" or args.tracker_option or args.arg):
        raise Refused("--tracker, --tracker-option and --arg configure the graph this command starts; with --address "
                      "the cluster's app runs as it was deployed")
    if args.inflight is not None and args.inflight < 1 or args.retries < 0:
        raise Refused(f"--inflight must be at least 1 and --retries at least 0 (given {args.inflight}, {args.retries})")
    items = load(args.manifest, _batch_config(args))  # every line checked before anything starts
    dest = Dest(args.out)
    try:
        if args.local:
            from serve_app.trackers import build, preflight

            tracker = _tracker(args)
            preflight(tracker)
            segmenter = LocalSegmenter(build(tracker))
        elif args.address:
            segmenter = connect(args.address, args.app)
        else:
            from serve_app.app import start_app

            segmenter = HandleSegmenter(start_app(_app_args(args, joining=False)))
        # After ray.init: Ray's own SIGTERM handler exits at once; a stop must cancel the jobs in
        # flight and write results.jsonl for what finished.
        signal.signal(signal.SIGTERM, _interrupt)
        report = Batch(items, dest, segmenter, inflight=args.inflight, retries=args.retries,
                       show_progress=not args.quiet).run()
    except KeyboardInterrupt:
        print("stopped; run the same command again to finish", file=sys.stderr)
        return 130
    if not args.quiet:
        print(summary(report, dest), file=sys.stderr)
    return report.exit_code


def _batch_config(args: argparse.Namespace) -> dict[str, Any]:
    """The job config the command line gives every input (a manifest line's own config wins)."""
    try:
        config = json.loads(args.config) if args.config else {}
    except json.JSONDecodeError as exc:
        raise Refused(f"--config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise Refused(f"--config must be a JSON object, not {type(config).__name__}")
    flags = {"prompt": args.prompt, "mode": args.mode, "alpha": args.alpha,
             "confidence_threshold": args.confidence_threshold, "max_objects": args.max_objects}
    config |= {k: v for k, v in flags.items() if v is not None}
    if args.objects:
        config["outputs"] = ["video", "objects"]
    return config


def _synth(args: argparse.Namespace) -> None:
    from serve_app.synthetic import write_clip

    write_clip(args.output, width=args.width, height=args.height, num_frames=args.frames, fps=args.fps)
    _done(args, f"{args.width}x{args.height}, {args.frames} frames at {args.fps} fps")


def _check_config(args: argparse.Namespace) -> int:
    from serve_app.deploy import check_files

    problems = check_files(args.files)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems and not args.quiet:
        print(f"ok: {', '.join(args.files)}", file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam3-video", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def tracker_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tracker", default="sam3",
                       help="'sam3' (default), 'fake' (the stand-in test double), or an import path module:Name")
        p.add_argument("--tracker-option", action="append", default=[], metavar="KEY=VALUE",
                       help="a field of the tracker's config (JSON values; for module:Name, its constructor's), repeatable")

    seg = sub.add_parser("segment", help="segment the objects a text prompt names in an mp4")
    seg.add_argument("input", help="input mp4")
    seg.add_argument("-o", "--output", required=True, help="output mp4")
    seg.add_argument("--prompt", action="append", default=[],
                     help="what to segment, e.g. 'fish'; repeat it for several concepts in one pass")
    seg.add_argument("--box", action="append", default=[], metavar="X,Y,W,H",
                     help="an exemplar box on the prompt frame (pixels): objects like this one; repeatable")
    seg.add_argument("--negative-box", action="append", default=[], metavar="X,Y,W,H",
                     help="an exemplar box of what is not wanted; repeatable")
    seg.add_argument("--prompt-frame", type=int, default=0, metavar="N",
                     help="the frame the prompts and boxes apply to; earlier frames are tracked backwards")
    seg.add_argument("--mode", choices=["mask", "overlay"], default="mask")
    seg.add_argument("--alpha", type=float, default=0.5, help="mask opacity in overlay mode")
    seg.add_argument("--confidence-threshold", type=float, default=0.5)
    seg.add_argument("--max-objects", type=int, help="objects tracked at most, 1-64 (default 16)")
    seg.add_argument("--objects", action="store_true",
                     help="also write OUTPUT.objects.json: every frame's objects, masks as COCO RLE")
    tracker_flags(seg)
    where = seg.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run every stage in this process (no Ray)")
    where.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000 (token: SAM3_VIDEO_TOKEN)")
    seg.add_argument("-q", "--quiet", action="store_true")

    srv = sub.add_parser("serve", help="serve the graph over HTTP on a local or joined Ray cluster")
    srv.add_argument("--address", help="join this Ray cluster (e.g. auto); default: start one here")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    tracker_flags(srv)
    srv.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                     help="an AppArgs field (serve_app/app.py), e.g. tracker_max_replicas=2; repeatable")

    bat = sub.add_parser("batch", help="segment every video a manifest names into a folder; a rerun skips what is done",
                         description="MANIFEST: a .jsonl file ({\"input\", \"config\", \"output\"} per line), a .csv "
                                     "(input,prompt[,mode,...] columns) or a glob of inputs with --prompt; paths or "
                                     "fsspec URLs. Exit status 0: all done or skipped; 1: some failed (results.jsonl "
                                     "says which and why); 2: the batch could not run.")
    bat.add_argument("manifest", metavar="MANIFEST")
    bat.add_argument("--out", required=True, metavar="DEST", help="a folder or fsspec URL: NAME.mp4, "
                     "NAME.objects.json, NAME.done.json, results.jsonl")
    bat.add_argument("--prompt", help="config for every input (a manifest line's config wins)")
    bat.add_argument("--mode", choices=["mask", "overlay"])
    bat.add_argument("--alpha", type=float)
    bat.add_argument("--confidence-threshold", type=float)
    bat.add_argument("--max-objects", type=int)
    bat.add_argument("--objects", action="store_true", help="also write NAME.objects.json")
    bat.add_argument("--config", help="a JSON job config for every input, e.g. '{\"prompt\": \"fish\"}'")
    bat_where = bat.add_mutually_exclusive_group()
    bat_where.add_argument("--address", help="run as a driver on this Ray cluster (e.g. auto), through its app's handle; "
                           "default: start the graph here")
    bat_where.add_argument("--local", action="store_true", help="run every stage in this process (no Ray)")
    bat.add_argument("--app", default="sam3-video", help="the app's name on the cluster (with --address)")
    tracker_flags(bat)
    bat.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                     help="an AppArgs field of the graph this command starts, repeatable")
    bat.add_argument("--inflight", type=int, help="jobs in the graph at once; default: what it runs at once")
    bat.add_argument("--retries", type=int, default=3, help="tries again after a 5xx or a lost replica (default 3)")
    bat.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no closing table")

    syn = sub.add_parser("synth", help="write a synthetic clip of coloured shapes (for dry runs)")
    syn.add_argument("output")
    syn.add_argument("--width", type=int, default=640)
    syn.add_argument("--height", type=int, default=360)
    syn.add_argument("--frames", type=int, default=60)
    syn.add_argument("--fps", type=int, default=25)
    syn.add_argument("-q", "--quiet", action="store_true")

    chk = sub.add_parser("check-config", help="check serve_config.yaml, cluster.yaml, a KubeRay RayService offline (misspelt keys included)")
    chk.add_argument("files", nargs="+", metavar="FILE", help="a Serve config, a Ray cluster config or a RayService")
    chk.add_argument("-q", "--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"segment": _segment, "serve": _serve, "batch": _batch, "synth": _synth, "check-config": _check_config}
    try:
        return commands[args.command](args) or 0
    except (ServiceError, Refused) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except ValidationError as exc:  # an --arg that AppArgs refuses
        print("error: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()), file=sys.stderr)
    except OSError as exc:  # an input that cannot be read, an output that cannot be written
        print(f"error: {exc.filename}: {exc.strerror or exc}" if exc.filename else f"error: {exc.strerror or exc}",
              file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
