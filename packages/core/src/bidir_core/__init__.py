"""bidir-core: bidirectional Llama embedding models.

from bidir_core import LlamaBidirectionalModel, BiEncoder, CrossEncoder, pool
"""

from bidir_core.checkpoint import EncoderConfig
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.model import LlamaBidirectionalModel
from bidir_core.pooling import POOLING_STRATEGIES, pool
from bidir_core.reranker_config import RerankerConfig

__version__ = "0.1.0"

__all__ = [
    "POOLING_STRATEGIES",
    "BiEncoder",
    "BidirError",
    "CrossEncoder",
    "EncoderConfig",
    "LlamaBidirectionalModel",
    "RerankerConfig",
    "pool",
]
