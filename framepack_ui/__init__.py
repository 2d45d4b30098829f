"""FramePack UI: FramePack F1 image-to-video on your own machine, within its RAM and VRAM."""

__version__ = "0.1.0"
