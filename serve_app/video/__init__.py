"""The faithful video path on CPU: probe (validate, learn), decode (frames a player shows),
encode (same size, frame count, timestamps, rotation and audio as the input).

PyAV and decord are imported lazily inside the functions so that importing this package
stays cheap.
"""

from serve_app.video.decode import iter_chunks
from serve_app.video.encode import Mp4Writer
from serve_app.video.probe import probe

__all__ = ["probe", "iter_chunks", "Mp4Writer"]
