"""lorafit: LoRA fine-tuning that is exact, fast, light on memory and safe."""

from .config import LoraConfig
from .errors import (AdapterError, AdapterFileError, ConfigError, DataError, LorafitError, MergeError,
                     TargetError, TrainingError)
from .model import LoraModel, load, wrap
from .version import __version__

__all__ = [
    "LoraConfig", "LoraModel", "wrap", "load", "__version__",
    "LorafitError", "ConfigError", "TargetError", "AdapterError", "AdapterFileError", "MergeError",
    "DataError", "TrainingError",
]
