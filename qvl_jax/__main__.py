"""`python -m qvl_jax ...` is the `qvl-jax` command."""

import sys

from qvl_jax.cli import main

sys.exit(main())
