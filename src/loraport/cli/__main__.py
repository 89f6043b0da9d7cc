"""``python -m loraport.cli``: the same as the ``loraport`` command."""

import sys

from . import main

sys.exit(main())
