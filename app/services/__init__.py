"""Database-level operations shared by the API and the worker."""
