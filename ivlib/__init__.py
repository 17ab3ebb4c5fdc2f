"""ivlib: Iterative Vectors and the in-context-learning baselines it is compared with.

The Python API (`ivlib.api`, README "Python API"): `wrap` a model and tokenizer, get a task
(`load_task`, `task_from_lists`), `fit` a method, `evaluate` it, `save`/`load` its state and
`steer` the model's own forward or `generate` with it.
"""

__version__ = "0.2.0"

from .api import (  # noqa: E402  (after __version__, which the modules below import)
    Evaluation,
    batch,
    encode,
    encoder,
    evaluate,
    fit,
    load,
    load_task,
    sample_episodes,
    save,
    steer,
    task_from_lists,
    tiny_model,
    wrap,
)
from .errors import UsageError  # noqa: E402
from .methods import METHODS, Method, get_method  # noqa: E402

__all__ = [
    "METHODS",
    "Evaluation",
    "Method",
    "UsageError",
    "__version__",
    "batch",
    "encode",
    "encoder",
    "evaluate",
    "fit",
    "get_method",
    "load",
    "load_task",
    "sample_episodes",
    "save",
    "steer",
    "task_from_lists",
    "tiny_model",
    "wrap",
]
