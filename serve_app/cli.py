"""`sam3-video`: segment a video from the command line.

    sam3-video segment IN.mp4 -o OUT.mp4 --prompt "fish" [--mode overlay] [--local]
    sam3-video synth clip.mp4            # a synthetic clip of coloured shapes, for dry runs
"""

from __future__ import annotations

import argparse
import json
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


def _synth(args: argparse.Namespace) -> None:
    from serve_app.synthetic import write_demo_clip

    write_demo_clip(args.output, width=args.width, height=args.height, num_frames=args.frames, fps=args.fps)
    if not args.quiet:
        print(f"wrote {args.output}", file=sys.stderr)


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
    seg.add_argument("--local", action="store_true", help="run every stage in this process (no Ray)")
    seg.add_argument("-q", "--quiet", action="store_true")

    syn = sub.add_parser("synth", help="write a synthetic clip of coloured shapes (for dry runs)")
    syn.add_argument("output")
    syn.add_argument("--width", type=int, default=640)
    syn.add_argument("--height", type=int, default=360)
    syn.add_argument("--frames", type=int, default=60)
    syn.add_argument("--fps", type=int, default=25)
    syn.add_argument("-q", "--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "segment":
            _segment_local(args, _config(args))
        elif args.command == "synth":
            _synth(args)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
