"""objects.json: the kept objects of every frame, for users who want the masks, not a video.

    {"width": W, "height": H, "fps": 25.0, "timestamps": [0.0, 0.04, ...], "prompts": ["fish", ...],
     "frames": [[{"id": 0, "prompt": "fish", "score": 0.91, "box": [x, y, w, h],
                  "mask": {"size": [H, W], "counts": "..."}}, ...], ...]}

One entry per frame, in order; `timestamps` are the frames' presentation times in seconds;
`prompts` the job's concepts and each object's `prompt` the one it was found for (null: found by
exemplar boxes alone);
`box` is in pixels (COCO's x, y, width, height); `mask` is COCO RLE (pycocotools: decode with
`pycocotools.mask.decode`), so the file grows with the masks' outlines, not their areas. It is
written as frames come, never held whole.
"""

from __future__ import annotations

import json
import os

import numpy as np

from serve_app.media import Detections, VideoInfo


class ObjectsWriter:
    def __init__(self, path: str | os.PathLike, info: VideoInfo, prompts: list[str] = ()) -> None:
        self.width, self.height, self.prompts = *info.display_size, list(prompts)
        self.file = open(path, "w")
        first = float(info.pts[0] * info.time_base) if info.pts else 0.0
        head = {"width": self.width, "height": self.height, "fps": round(float(info.avg_fps), 6),
                "timestamps": [round(float(p * info.time_base) - first, 6) for p in info.pts], "prompts": self.prompts}
        self.file.write(json.dumps(head)[:-1] + ', "frames": [')
        self.frames = 0

    def add(self, dets: Detections) -> None:
        from pycocotools import mask as rle

        objects = []
        if len(dets):
            encoded = rle.encode(np.asfortranarray(dets.masks.transpose(1, 2, 0), dtype=np.uint8))  # one copy
            for i, code in enumerate(encoded):
                x, y, w, h = (float(v) for v in dets.boxes_xywh[i])
                concept = 0 if dets.concepts is None else int(dets.concepts[i])
                objects.append({"id": int(dets.obj_ids[i]),
                                "prompt": self.prompts[concept] if 0 <= concept < len(self.prompts) else None,
                                "score": round(float(dets.scores[i]), 4),
                                "box": [round(x * self.width, 1), round(y * self.height, 1),
                                        round(w * self.width, 1), round(h * self.height, 1)],
                                "mask": {"size": [self.height, self.width], "counts": code["counts"].decode("ascii")}})
        self.file.write(("," if self.frames else "") + json.dumps(objects, separators=(",", ":")))
        self.frames += 1

    def close(self) -> None:
        self.file.write("]}")
        self.file.close()
