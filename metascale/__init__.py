"""metascale: meta-learn layer-wise step sizes and rescaling factors; ship them as a frozen
``torch.optim.Optimizer``.

Quick use of an exported optimizer::

    import metascale
    opt = metascale.load_optimizer("runs/sine/optimizer.safetensors", model.parameters())
"""
from .errors import ExportFormatError, MetascaleError, MissingExtraError, SpecError
from .export import load_optimizer, read_optimizer, save_optimizer
from .optim import LayerwiseConfig, LayerwiseOptimizer

__version__ = "0.1.0"

__all__ = ["ExportFormatError", "MetascaleError", "MissingExtraError", "SpecError", "load_optimizer",
           "read_optimizer", "save_optimizer", "LayerwiseConfig", "LayerwiseOptimizer", "__version__"]
