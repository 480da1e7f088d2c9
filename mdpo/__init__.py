"""mDPO: conditional preference optimisation for vision-language models.

    from mdpo import MDPOLoss

Importing `mdpo` is light (no torch): the loss, data, model and training modules load on first use.
"""
__all__ = ["MDPOLoss", "mdpo_loss"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from . import loss

        return getattr(loss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
