"""Export a meta-trained optimizer to one ``.safetensors`` file and load it back."""
from .format import FORMAT, FORMAT_VERSION, ExportedOptimizer, load_optimizer, read_optimizer, save_optimizer
from .loss_format import ExportedLoss, file_format, load_loss, read_loss, save_loss

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedOptimizer", "load_optimizer", "read_optimizer", "save_optimizer",
           "ExportedLoss", "file_format", "load_loss", "read_loss", "save_loss"]
