"""`python -m resrl ...` is the `resrl` command."""

import sys

from resrl.cli import main

sys.exit(main())
