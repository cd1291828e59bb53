"""The hangout wire contract: codec, models, error codes and a client.

Nothing here imports from ``server``; clients and load tests depend on this
package alone.
"""
