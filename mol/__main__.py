"""`python -m mol ...`: the `mol` command, also as launchers start it (`torchrun -m mol train ...`)."""

import sys

from mol.cli import main

sys.exit(main())
