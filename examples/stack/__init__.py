"""The code the docker-compose demo stack runs: :mod:`.app` (Celery) and :mod:`.producer`."""
