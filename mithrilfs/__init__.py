"""mithrilfs: a content-addressed FUSE filesystem for GPU compiler caches."""

__version__ = "0.1.0"
