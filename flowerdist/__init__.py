"""flowerdist: train residual networks on flower photos, from one CPU to many GPU nodes."""

__version__ = "0.1.0"
