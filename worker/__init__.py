"""Celery adapter: the app (``celery_app``), the retrain task (``tasks``) and the worker entry
point (``make_celery``). The logic lives in ``src``; this package only wires it to Celery."""
