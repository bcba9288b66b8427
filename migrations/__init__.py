"""Alembic migrations of the registry database (``mavis db upgrade``)."""
