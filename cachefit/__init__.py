"""cachefit: split a model into contiguous layer groups that each fit a device's on-chip memory."""

__version__ = "0.1.0"
