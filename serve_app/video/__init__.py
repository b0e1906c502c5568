"""The media path on CPU: probe (validate, learn), decode (frames a player shows), composite
(masks and overlays as SAM 3 draws them), encode (same size, frame count, timestamps, rotation
and audio as the input), and the threads that let them overlap.

PyAV and decord are imported lazily inside the functions so that importing this package
stays cheap.
"""
