"""``python -m src.cli``: the ``urbansound`` command without the installed script (the stack,
``urbansound up`` and the images start their child processes this way)."""

from . import main

main()
