"""Database access: where each query runs (database.py, over pool.py,
replicas.py, positions.py for read-your-writes and batching.py for merged
calls), migrations (migrate.py), the layer's errors (errors.py), and one
module of SQL per service. The only place SQL lives."""
