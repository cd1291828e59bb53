import sys

from server.devstack.cli import main

sys.exit(main())
