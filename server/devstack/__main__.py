import sys

from server.devstack import main

sys.exit(main())
