"""``lorafit serve``: an OpenAI-compatible server for a base model and many LoRA adapters.

One engine thread owns the model and decodes every request in shared batches, one adapter per
row (`engine`); the HTTP layer speaks OpenAI's protocol (`app`, `protocol`); adapters load
lazily and are evicted least-recently-used (`adapters`).
"""

from .adapters import AdapterPool, check_adapter_name, discover
from .app import ServeSettings, create_app
from .engine import Delta, Engine, Failed, Finished, Request
from .sampling import SamplingParams

__all__ = [
    "AdapterPool", "check_adapter_name", "discover", "ServeSettings", "create_app",
    "Delta", "Engine", "Failed", "Finished", "Request", "SamplingParams",
]
