"""openk2: the Kimi K2 system in plain PyTorch."""

from openk2.config import ModelConfig

__all__ = ["ModelConfig", "Transformer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so `import openk2` (and the CLI) does not import torch until a model is needed.
    if name == "Transformer":
        from openk2.model.transformer import Transformer

        return Transformer
    raise AttributeError(name)
