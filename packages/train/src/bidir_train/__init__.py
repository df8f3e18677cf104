"""bidir_train: fine-tuning of bidir models (contrastive, MNTP, CoSENT, or a cross-encoder reranker) under torchrun
+ FSDP2, configured by YAML recipes.

from bidir_train import load_recipe, train
train(load_recipe("default", ["optim.lr=1e-5"]))
"""

from bidir_train.config import TrainConfig
from bidir_train.recipe import load_recipe

__version__ = "0.1.0"
__all__ = ["TrainConfig", "load_recipe", "train"]


def train(cfg: TrainConfig) -> dict:
    """Run a training (see bidir_train.trainer.train)."""
    from bidir_train.trainer import train as _train

    return _train(cfg)
