"""Celery adapter: the retrain task (``tasks``) and the worker's entry point (``make_celery``,
which builds the Flask app and takes the Celery app ``web.celery_app.celery_init_app`` made for
it, as in Flask's ``examples/celery``). The logic lives in ``src``; this package only wires it
to Celery, and depends on ``web``, never the other way round."""
