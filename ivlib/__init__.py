"""ivlib: Iterative Vectors and the in-context-learning baselines it is compared with."""

__version__ = "0.2.0"
