"""mDPO: conditional preference optimisation for vision-language models.

    from mdpo import MDPOLoss

Importing `mdpo` is light (no torch): the loss, data, model and training modules load on first use.
"""
import logging as _logging

__all__ = ["MDPOLoss", "mdpo_loss"]
__version__ = "0.1.0"


class _OptionalHubKernelFilter(_logging.Filter):
    """bitsandbytes (imported by peft whenever it is installed, so in every run) logs at import that it could
    not fetch an optional CPU kernel from the model hub, then runs its built-in one: two lines of noise per
    process that say nothing about the run. Only those two messages are dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    _logging.getLogger(_name).addFilter(_OptionalHubKernelFilter())


def __getattr__(name):
    if name in __all__:
        from . import loss

        return getattr(loss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
