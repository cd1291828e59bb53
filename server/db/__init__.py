"""Database access: pools and read routing (pools.py), migrations
(migrate.py) and one module of SQL per service. The only place SQL lives."""
