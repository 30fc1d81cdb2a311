"""urbansound's ML core: importable as ``src`` (the cookiecutter-data-science convention).

Knows nothing of Flask or Celery: ``web`` and ``worker`` are thin adapters over it.
"""
