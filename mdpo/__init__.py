"""mDPO: conditional preference optimisation for vision-language models.

    from mdpo import MDPOLoss

Importing `mdpo` is light (no torch): the loss, data, model and training modules load on first use.
"""
import logging as _logging

__all__ = ["MDPOLoss", "mdpo_loss"]
__version__ = "0.1.0"


class _ImportNoiseFilter(_logging.Filter):
    """Lines that optional packages log at import and that say nothing about the run, dropped by message:
    bitsandbytes (imported by peft whenever it is installed, so in every run) could not fetch an optional
    CPU kernel from the model hub and runs its built-in one (two lines); DeepSpeed (imported by
    transformers / accelerate whenever it is installed, even in a ddp run) found no GPU and picked its CPU
    accelerator (one line, with a timestamp, in the middle of the run's output). Nothing else is dropped."""

    NOISE = ("kernels-community", "Setting accelerator to CPU. If you have GPU or other accelerator")

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub", "DeepSpeed"):
    _logging.getLogger(_name).addFilter(_ImportNoiseFilter())


def __getattr__(name):
    if name in __all__:
        from . import loss

        return getattr(loss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
