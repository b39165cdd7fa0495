"""lorafit: LoRA fine-tuning that is exact, fast, light on memory and safe."""

from .config import LoraConfig
from .errors import (AdapterError, AdapterFileError, ConfigError, DataError, LorafitError, MergeError,
                     TargetError, TrainingError)
from .model import LoraModel, wrap
from . import variants  # noqa: E402,F401  (registers DoRA, PiSSA/OLoRA, quantised bases)
from .adapter_files import load  # noqa: E402  (after variants: the file format names their tensors)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraModel", "wrap", "load", "__version__",
    "LorafitError", "ConfigError", "TargetError", "AdapterError", "AdapterFileError", "MergeError",
    "DataError", "TrainingError",
]
