"""The model registry (versions and aliases, in the database) and the artifact store (files).

versions.py  register, list and resolve versions; move aliases
store.py     the ArtifactStore interface and its local-folder implementation
"""
