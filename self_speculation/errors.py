"""Errors a user can act on. Scripts print them as one line and exit non-zero."""


class LayerSkipError(Exception):
    """Base class of every error meant for the user, not for a traceback."""


class ConfigError(LayerSkipError, ValueError):
    """A configuration value is out of range or inconsistent."""


class UnsupportedModelError(LayerSkipError):
    """The model lacks something LayerSkip needs (decoder layers, final norm, LM head...)."""


class ModelLoadError(LayerSkipError):
    """A model or tokenizer could not be loaded (missing path, unreachable hub, bad file)."""
