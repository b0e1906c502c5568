"""`sam3-video`: segment a video from the command line, or serve the graph.

    sam3-video segment IN.mp4 -o OUT.mp4 --prompt "fish"   # through the graph on an embedded Ray
    sam3-video segment ... --url http://host:8000          # through a running service
    sam3-video segment ... --local                         # every stage in this process, no Ray
    sam3-video serve [--address auto] [--port 8000]        # HTTP service on a local/joined Ray
    sam3-video synth clip.mp4                              # a synthetic clip, for dry runs
    sam3-video check-config serve_config.yaml cluster.yaml # the deploy files, offline
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from serve_app.contract import JobConfig, parse_config
from serve_app.errors import ServiceError
from serve_app.trackers import FAKE_TRACKER, SAM3_TRACKER

TRACKER_ALIASES = {"sam3": SAM3_TRACKER, "fake": FAKE_TRACKER}


def _tracker_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --tracker-option {pair!r} must be key=value")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _config(args: argparse.Namespace) -> JobConfig:
    return parse_config(
        {
            "prompt": args.prompt,
            "mode": args.mode,
            "alpha": args.alpha,
            "confidence_threshold": args.confidence_threshold,
        }
    )


def _segment_local(args: argparse.Namespace, config: JobConfig) -> None:
    from tqdm import tqdm

    from serve_app.pipeline import run_local
    from serve_app.trackers import load_tracker

    options = _tracker_options(args.tracker_option)
    tracker = load_tracker(TRACKER_ALIASES.get(args.tracker, args.tracker), **options)
    with tqdm(unit="frame", desc="segment", disable=args.quiet) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        timings = run_local(args.input, args.output, config, tracker, progress=progress)
    if not args.quiet:
        print(
            f"wrote {args.output}: probe {timings.probe_ms:.0f} ms, decode {timings.decode_ms:.0f} ms, "
            f"track {timings.track_ms:.0f} ms, composite {timings.composite_ms:.0f} ms, "
            f"encode {timings.encode_ms:.0f} ms, total {timings.total_ms:.0f} ms",
            file=sys.stderr,
        )


def _app_args(args: argparse.Namespace) -> dict[str, Any]:
    tracker = TRACKER_ALIASES.get(args.tracker, args.tracker)
    app: dict[str, Any] = {"tracker": tracker, "tracker_options": _tracker_options(args.tracker_option)}
    if tracker != SAM3_TRACKER or not _has_cuda():
        app["tracker_num_gpus"] = 0
    for pair in getattr(args, "arg", []):
        key, _, raw = pair.partition("=")
        try:
            app[key] = json.loads(raw)
        except json.JSONDecodeError:
            app[key] = raw
    return app


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _segment_remote(args: argparse.Namespace, config: JobConfig) -> None:
    from tqdm import tqdm

    from serve_app import remote

    with open(args.input, "rb") as f:
        video = f.read()
    where = args.url or "embedded Ray"
    with tqdm(total=1, desc=f"segment via {where}", unit="job", disable=args.quiet) as bar:
        if args.url:
            mp4, headers = remote.segment_via_url(args.url, video, config, token=os.environ.get("SAM3_VIDEO_TOKEN"))
            summary = ", ".join(f"{k[2:-3]} {v} ms" for k, v in headers.items() if k.lower().endswith("-ms"))
        else:
            result = remote.segment_via_graph(remote.start_graph(_app_args(args)), video, config)
            mp4, t = result.mp4, result.timings
            summary = (f"probe {t.probe_ms:.0f} ms, decode {t.decode_ms:.0f} ms, track {t.track_ms:.0f} ms, "
                       f"encode {t.encode_ms:.0f} ms, total {t.total_ms:.0f} ms")
        bar.update(1)
    with open(args.output, "wb") as f:
        f.write(mp4)
    if not args.quiet:
        print(f"wrote {args.output}: {summary}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    import time

    from serve_app import remote

    remote.start_graph(_app_args(args), address=args.address, http=(args.host, args.port))
    print(f"serving POST http://{args.host}:{args.port}/v2/job (Ctrl-C stops)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


def _synth(args: argparse.Namespace) -> None:
    from serve_app.synthetic import write_demo_clip

    write_demo_clip(args.output, width=args.width, height=args.height, num_frames=args.frames, fps=args.fps)
    if not args.quiet:
        print(f"wrote {args.output}", file=sys.stderr)


def _check_config(args: argparse.Namespace) -> int:
    from serve_app.deploy_check import check_files

    problems = check_files(args.files)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems and not args.quiet:
        print(f"ok: {', '.join(args.files)}", file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam3-video", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment the objects a text prompt names in an mp4")
    seg.add_argument("input", help="input mp4")
    seg.add_argument("-o", "--output", required=True, help="output mp4")
    seg.add_argument("--prompt", required=True, help="what to segment, e.g. 'fish'")
    seg.add_argument("--mode", choices=["mask", "overlay"], default="mask")
    seg.add_argument("--alpha", type=float, default=0.5, help="mask opacity in overlay mode")
    seg.add_argument("--confidence-threshold", type=float, default=0.5)
    seg.add_argument(
        "--tracker",
        default="sam3",
        help="'sam3' (default), 'fake' (the stand-in test double), or an import path module:Name",
    )
    seg.add_argument("--tracker-option", action="append", default=[], metavar="KEY=VALUE",
                     help="keyword option for the tracker's constructor (JSON values), repeatable")
    where = seg.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run every stage in this process (no Ray)")
    where.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000 (token: SAM3_VIDEO_TOKEN)")
    seg.add_argument("-q", "--quiet", action="store_true")

    srv = sub.add_parser("serve", help="serve the graph over HTTP on a local or joined Ray cluster")
    srv.add_argument("--address", help="join this Ray cluster (e.g. auto); default: start one here")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--tracker", default="sam3", help="as for segment")
    srv.add_argument("--tracker-option", action="append", default=[], metavar="KEY=VALUE")
    srv.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                     help="an AppArgs field (serve_app/app.py), e.g. tracker_max_replicas=2; repeatable")

    syn = sub.add_parser("synth", help="write a synthetic clip of coloured shapes (for dry runs)")
    syn.add_argument("output")
    syn.add_argument("--width", type=int, default=640)
    syn.add_argument("--height", type=int, default=360)
    syn.add_argument("--frames", type=int, default=60)
    syn.add_argument("--fps", type=int, default=25)
    syn.add_argument("-q", "--quiet", action="store_true")

    chk = sub.add_parser("check-config", help="check serve_config.yaml / cluster.yaml offline (misspelt keys included)")
    chk.add_argument("files", nargs="+", metavar="FILE", help="a Serve config or a Ray cluster config")
    chk.add_argument("-q", "--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "segment":
            config = _config(args)
            if args.local:
                _segment_local(args, config)
            else:
                _segment_remote(args, config)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "synth":
            _synth(args)
        elif args.command == "check-config":
            return _check_config(args)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
