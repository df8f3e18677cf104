"""`python -m bidir_serve.batch_embed` (and `torchrun ... -m bidir_serve.batch_embed`) is `batch-embed`: the command
line lives in bidir_serve.batch.cli; this module keeps the documented `-m` path."""

import sys

from bidir_serve.batch.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
