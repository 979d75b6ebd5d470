"""Alembic migrations of the store, applied by :func:`shipyard.store.migrate.upgrade` on open."""
