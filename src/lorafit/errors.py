"""One exception hierarchy for everything lorafit refuses.

Every message names the thing at fault (a config field, a file, a tensor key, a data record) and
what was expected, so a user can fix the input without reading lorafit's source.
"""


class LorafitError(Exception):
    """Base class of every error lorafit raises on purpose."""


class ConfigError(LorafitError, ValueError):
    """A configuration field has a wrong value, a wrong type, or an unknown name."""


class TargetError(ConfigError):
    """`target_modules` (or another module selector) matches nothing usable in the model."""


class AdapterError(LorafitError):
    """An adapter name or adapter operation is invalid (unknown name, duplicate, wrong state)."""


class AdapterFileError(LorafitError):
    """An adapter directory or file is missing, unsafe, corrupt, or does not fit the model."""


class MergeError(LorafitError):
    """A merge would corrupt the weights (NaN/Inf delta) or is not possible for this layer."""


class DataError(LorafitError):
    """A data file or record is malformed; the message names the file and line."""


class TrainingError(LorafitError):
    """Training cannot go on (NaN/Inf loss, unwritable output, broken checkpoint)."""


class ExportError(LorafitError):
    """A model or adapter cannot be exported to the requested format (unsupported architecture,
    tokenizer or adapter feature); the message lists what is supported."""
