"""``python -m starttls_proxy``: the same as the ``starttls-proxy`` command."""

import sys

from starttls_proxy.cli import main

sys.exit(main())
