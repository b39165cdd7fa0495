"""Adapter files: PEFT-compatible save and load, safe reading, fingerprints.

An adapter directory is what PEFT writes and reads:

* ``adapter_config.json``: PEFT's ``LoraConfig`` keys (``peft_type: "LORA"``, ``r``,
  ``lora_alpha``, ``target_modules``, ...), see `peft_config`;
* ``adapter_model.safetensors``: tensors named ``base_model.model.<module path>.<suffix>``
  (`keys`), modules_to_save copies under their module's own path, biases for
  ``bias="all"``/``"lora_only"``. Its header keeps ``format: pt`` and adds lorafit's metadata,
  which PEFT ignores: the lorafit version, the config it was saved with, a checksum of the
  tensors, a base-model fingerprint (`fingerprints`) and any user metadata (e.g. labels).

Several adapters saved together: "default" in the directory, the others in ``<dir>/<name>/``.

    model.save_adapter("out/")                            # every adapter
    model = lorafit.load(base_model, "out/")              # frozen, eval mode, active
    model.load_adapter("out/b", adapter_name="b")
    model.load_adapter("new/", adapter_name="b", replace=True)   # hot swap when shapes fit
"""

from .fingerprints import fingerprint
from .loading import apply_new, check_new_name, load_adapter, loaded_metadata, plan
from .provenance import TrainedBase, inference_dtype, label_config, trained_base
from .reading import (CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, AdapterDir, AdapterFileWarning,
                      read_adapter_dir)
from .saving import save_adapter

__all__ = [
    "save_adapter", "load_adapter", "loaded_metadata", "plan", "apply_new", "check_new_name",
    "read_adapter_dir", "AdapterDir", "AdapterFileWarning", "fingerprint", "TrainedBase", "trained_base",
    "inference_dtype", "label_config",
    "CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME",
]
