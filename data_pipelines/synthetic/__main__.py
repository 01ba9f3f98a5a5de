"""`python -m data_pipelines.synthetic --out DIR`: writes the synthetic corpus (see `corpus.py`)."""

import sys

from data_pipelines.synthetic.corpus import main

sys.exit(main())
