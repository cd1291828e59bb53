"""A test server: ``python -m tests.server_with_test_methods serve``.

``python -m server`` with the test-only methods of ``tests/debug_methods.py``
registered as well, for ``ServerProcess(stack, test_methods=True)``. The
server itself never imports ``tests``. One process only (``WORKERS=1``):
worker processes are started as ``python -m server`` and would lack them.
"""

import sys

import tests.debug_methods  # noqa: F401  (importing it registers the methods)
from server.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
