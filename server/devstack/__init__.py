from server.devstack.postgres import *  # noqa: F401,F403
from server.devstack.postgres import main  # noqa: F401
