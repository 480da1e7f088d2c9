"""The library's own errors: one base class, so a command line prints one clear line for any of them."""
from __future__ import annotations


class MdpoError(Exception):
    """Base of every error mdpo raises on purpose (bad config, bad record, stale cache, …).

    Its message is meant for a person: it names the key, record, file or argument at fault and, where
    there is one, the setting that fixes it. The command-line tools print it as one line and exit 2.
    """


class ConfigError(MdpoError, ValueError):
    """A config file, override or setting that cannot be used as it is; the message names the key."""


class ModelLoadError(MdpoError, ValueError):
    """A model folder, preset, family or model_type that cannot be used; the message names it."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """`model.path` is not a folder, or a folder without config.json."""


class UnsupportedModelError(MdpoError, NotImplementedError):
    """A model this trainer would compute wrong numbers for (e.g. soft-capped logits)."""


class TrainingOutOfMemoryError(MdpoError, RuntimeError):
    """The accelerator ran out of memory; the message gives the settings that lower it."""
