"""Text-prompted video segmentation with SAM 3, served as a Ray Serve deployment graph.

Importing this package is cheap: torch, sam3, decord, av and ray are imported lazily by the
modules that need them, so the contract and the HTTP layer are usable without them.
"""

__version__ = "0.1.0"
