"""Export a meta-trained optimizer to one ``.safetensors`` file and load it back."""
from .format import FORMAT, FORMAT_VERSION, ExportedOptimizer, load_optimizer, read_optimizer, save_optimizer

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedOptimizer", "load_optimizer", "read_optimizer", "save_optimizer"]
