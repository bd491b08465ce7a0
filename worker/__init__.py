"""Celery workers that run the training jobs."""
