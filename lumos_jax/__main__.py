import sys

from lumos_jax.cli import main

sys.exit(main())
