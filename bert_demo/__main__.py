"""``python -m bert_demo``: see :mod:`bert_demo.cli`."""

import sys

from bert_demo.cli import main

sys.exit(main())
