"""selector: hyperparameter search and model selection for PyTorch MLPs on tabular data.

The public names below are imported when first used (module `__getattr__`), so that
`import selector` stays light: the command line's read commands and the API's readers import
neither torch nor the engine, and the estimators import torch only when they fit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "MLPSearchClassifier": "selector.estimators",
    "MLPSearchRegressor": "selector.estimators",
    "RunSummary": "selector.record",
    "Study": "selector.api",
    "StudySpec": "selector.spec",
    "StudyStatus": "selector.summary",
    "TrialRecord": "selector.record",
    "load_study_spec": "selector.api",
}

__all__ = [
    "MLPSearchClassifier",
    "MLPSearchRegressor",
    "RunSummary",
    "Study",
    "StudySpec",
    "StudyStatus",
    "TrialRecord",
    "__version__",
    "load_study_spec",
]

if TYPE_CHECKING:
    from selector.api import Study, load_study_spec
    from selector.estimators import MLPSearchClassifier, MLPSearchRegressor
    from selector.record import RunSummary, TrialRecord
    from selector.spec import StudySpec
    from selector.summary import StudyStatus


def __getattr__(name: str) -> Any:
    """A public name, imported from its module at first use. Any other name is no attribute,
    so that `from selector import export` still finds the submodule."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'selector' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
