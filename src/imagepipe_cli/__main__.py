"""`python -m imagepipe_cli` is the `imagepipe` command."""

import sys

from imagepipe_cli.cli import main

sys.exit(main())
