"""Model registry: a name maps to a constructor `(num_classes, image_size, dtype)`.

Models know only their dtype policy. Loss scaling, loops and optimizers live in engine/.
"""

from models.layers import all_layers
from models.registry import MODEL_NAMES, create_model

__all__ = ["MODEL_NAMES", "all_layers", "create_model"]
