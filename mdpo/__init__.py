"""mDPO: conditional preference optimisation for vision-language models.

    from mdpo import MDPOLoss

Importing `mdpo` is light: the data, model and training modules load on first use.
"""
from .loss import MDPOLoss, mdpo_loss

__all__ = ["MDPOLoss", "mdpo_loss"]
__version__ = "0.1.0"
