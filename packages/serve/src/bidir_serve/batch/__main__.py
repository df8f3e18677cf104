"""`python -m bidir_serve.batch` is `batch-embed`."""

import sys

from bidir_serve.batch.cli import main

sys.exit(main())
