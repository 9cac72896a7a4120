"""metascale: meta-learn layer-wise step sizes and rescaling factors; ship them as a frozen
``torch.optim.Optimizer``.

Quick use of an exported optimizer::

    import metascale
    opt = metascale.load_optimizer("runs/sine/optimizer.safetensors", model.parameters())
"""
from .errors import CheckpointError, ExportFormatError, MetascaleError, MissingExtraError, SpecError
from .export import load_loss, load_optimizer, read_optimizer, save_loss, save_optimizer
from .meta import MetaTrainer
from .optim import AdaptiveConfig, AdaptiveOptimizer, LayerwiseConfig, LayerwiseOptimizer
from .spec import load_spec

__version__ = "0.1.0"

__all__ = ["load_loss", "save_loss", "ExportFormatError", "MetascaleError", "MissingExtraError", "SpecError", "load_optimizer",
           "read_optimizer", "save_optimizer", "MetaTrainer", "LayerwiseConfig", "LayerwiseOptimizer",
           "AdaptiveConfig", "AdaptiveOptimizer",
           "load_spec", "__version__", "CheckpointError"]
