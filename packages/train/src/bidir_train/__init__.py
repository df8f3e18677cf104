"""bidir_train: contrastive fine-tuning of bidir models under torchrun + FSDP2.

Not implemented yet; see the package README.
"""

__version__ = "0.1.0"
