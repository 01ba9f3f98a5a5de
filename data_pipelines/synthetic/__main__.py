"""`python -m vtimellm_jax.data_pipelines.synthetic --out DIR`: writes the synthetic corpus (see `corpus.py`)."""

import sys

from .corpus import main

sys.exit(main())
