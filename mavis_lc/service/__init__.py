"""The training service's Celery side: the app (`mavis_lc.service.app`, what ``mavis worker`` and
``celery -A mavis_lc.service.app`` run) and its tasks (`mavis_lc.service.tasks`), thin shells over
`mavis_lc.runner`. Importing this package imports nothing; its modules need the ``[worker]`` extra.
"""
