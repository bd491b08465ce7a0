"""Training jobs, both sides of the queue.

service.py    the API side: create (idempotently), read, list, cancel
execution.py  the worker side in the database: claim, record epochs, heartbeat, finish, sweep
runner.py     one job end to end on a worker: claim, train, evaluate, register
queue.py      the Celery app factory and `send_task` by name (the API never imports tasks)
sweeper.py    the periodic sweep (requeue dead claims, re-send lost messages)
"""
