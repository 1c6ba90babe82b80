"""selector: hyperparameter search and model selection for PyTorch MLPs on tabular data."""

__version__ = "0.1.0"
__all__ = ["__version__"]
