"""``adapter_config.json`` <-> `LoraConfig`, PEFT's key names on both sides.

lorafit's `LoraConfig` fields carry PEFT's names, so most keys map one to one. PEFT has more
keys than lorafit uses; each falls in one of three groups:

* keys whose non-default value changes the adapter's maths in a way lorafit does not implement
  (`lorafit.config.FEATURES` with no extension claiming them): refused by `LoraConfig`, because
  loading would give different outputs than PEFT;
* keys that only matter to PEFT's bookkeeping, to training or to initialisation (`BOOKKEEPING`):
  kept and written back on save, never reported;
* any other key (a newer PEFT's): kept and written back; reported by a warning when its value is
  not a default (None, False, empty), since lorafit ignores it.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from ..config import LoraConfig, field_names, is_default
from ..errors import AdapterFileError, ConfigError
from ..registry import find_init
from .reading import AdapterFileWarning

PEFT_TYPE = "LORA"

# Keys that do not change the loaded adapter's outputs: kept on round trip, not reported.
BOOKKEEPING = {
    "peft_version", "auto_mapping", "revision", "megatron_config", "megatron_core", "qalora_group_size",
    "velora_config",
}
# Runtime-only settings PEFT itself drops when loading.
DROPPED = {"peft_type", "runtime_config"}
# init_lora_weights schemes that rewrite the base weights from data or from the original weights
# (`lorafit.inits.prepare`), which loading cannot redo: such an adapter only fits the rewritten
# base saved beside it (or a plain-LoRA conversion), so loading warns. PiSSA and OLoRA are redone.
UNREPRODUCED_INITS = ("corda", "loftq", "lora_ga")


def config_from_peft(data: Any, where: str) -> tuple[LoraConfig, dict[str, Any]]:
    """Build a `LoraConfig` from an ``adapter_config.json`` object.

    Returns the config and the *extras*: every key lorafit does not model (plus an
    ``init_lora_weights`` value lorafit does not know or that needs `lorafit.inits.prepare`,
    replaced by True in the config: the scheme only matters at initialisation, and loading
    overwrites the factors). `where` names the file.
    """
    if not isinstance(data, Mapping):
        raise AdapterFileError(f"{where}: expected a JSON object, found {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type != PEFT_TYPE:
        found = "no peft_type key" if "peft_type" not in data else f"peft_type {peft_type!r}"
        raise AdapterFileError(f"{where}: {found}; lorafit loads LoRA adapters (peft_type \"{PEFT_TYPE}\") only")
    fields = set(field_names())
    kwargs = {key: value for key, value in data.items() if key in fields}
    extras = {key: value for key, value in data.items() if key not in fields and key not in DROPPED}
    init = kwargs.get("init_lora_weights", True)
    if any(str(init).lower().startswith(scheme) for scheme in UNREPRODUCED_INITS):
        warnings.warn(f"{where}: init_lora_weights = {init!r} rewrites the base weights, which lorafit cannot "
                      f"redo; the adapter only fits that rewritten base model", AdapterFileWarning, stacklevel=3)
    if not _redone_on_load(init):
        kwargs["init_lora_weights"] = True
        extras["init_lora_weights"] = init
    unknown = sorted(key for key, value in extras.items()
                     if key not in BOOKKEEPING and key != "init_lora_weights"
                     and not is_default(value))
    if unknown:
        warnings.warn(f"{where}: keys lorafit does not use, kept for saving but without effect: "
                      f"{', '.join(f'{k} = {extras[k]!r}' for k in unknown)}", AdapterFileWarning, stacklevel=3)
    try:
        config = LoraConfig.from_dict(kwargs, where=where)
    except ConfigError as exc:
        raise AdapterFileError(str(exc)) from None
    return config, extras


def config_to_peft(config: LoraConfig, extras: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The ``adapter_config.json`` object for `config`: its fields, the kept `extras`, PEFT's
    ``peft_type`` and ``inference_mode: true`` (as PEFT writes it), then `overrides`."""
    return {**config.to_dict(), **extras, "peft_type": PEFT_TYPE, "inference_mode": True, **overrides}


def _redone_on_load(value: Any) -> bool:
    """A scheme lorafit knows and can run while loading; not one that needs data or the original
    weights (`InitScheme.prepare`: its factors come from the file anyway)."""
    try:
        return find_init(value).prepare is None
    except ConfigError:
        return False
