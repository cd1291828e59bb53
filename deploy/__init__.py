"""Deployment configuration (nginx, PgBouncer) and the multi-host topology
that tests it on one machine (``deploy.topology``)."""
