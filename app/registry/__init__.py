"""The model registry (versions and aliases, in the database) and the artifact store (files).

versions.py  register, list and resolve versions; move aliases (flush only, the caller commits)
service.py   what the API calls: look versions up, move an alias (commit, retry, tell listeners)
store.py     the ArtifactStore interface and its local-folder implementation
"""
