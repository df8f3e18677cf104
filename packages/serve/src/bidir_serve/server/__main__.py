"""`python -m bidir_serve.server` is `bidir-server`."""

import sys

from bidir_serve.server.cli import main

sys.exit(main())
