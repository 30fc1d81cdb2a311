"""Entry point of ``celery -A worker.make_celery worker`` (and ``... flower``).

Flask's documented layout: build the Flask app, take the Celery app ``celery_init_app`` stored
on it, so every task runs in the app context with the web app's configuration.
"""

from web import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
