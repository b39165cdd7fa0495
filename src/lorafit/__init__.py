"""lorafit: LoRA fine-tuning that is exact, fast, light on memory and safe."""

from .config import LoraConfig
from .errors import (AdapterError, AdapterFileError, ConfigError, DataError, LorafitError, MergeError,
                     TargetError, TrainingError)
from .model import LoraModel, wrap
from . import variants  # noqa: E402,F401  (registers DoRA, PiSSA/OLoRA, quantised bases)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraModel", "wrap", "__version__",
    "LorafitError", "ConfigError", "TargetError", "AdapterError", "AdapterFileError", "MergeError",
    "DataError", "TrainingError",
]
