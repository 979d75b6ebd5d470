"""Alembic environment for the store. It runs only inside :func:`shipyard.store.migrate.upgrade`,
which hands over an open connection (``config.attributes["connection"]``); there is no
alembic.ini, so the server never needs a file beside the package to migrate its database.

``render_as_batch`` makes future ALTERs work on SQLite (which rebuilds the table instead).
"""

from alembic import context

from shipyard.store.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
