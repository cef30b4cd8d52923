"""The CoAtNet model family (Dai et al. 2021): configs, blocks, constructors and counting tools.

Nothing in this package imports torch.distributed or DeepSpeed, configures logging or looks at ranks.
"""

from .coatnet import CoAtNet
from .config import VARIANTS, CoAtNetConfig
from .factory import create_model, create_model_from_config, list_models
from .macs import MacCount, count_macs
from .relative_bias import resize_relative_bias_tables

__all__ = [
    "VARIANTS",
    "CoAtNet",
    "CoAtNetConfig",
    "MacCount",
    "count_macs",
    "create_model",
    "create_model_from_config",
    "list_models",
    "resize_relative_bias_tables",
]
