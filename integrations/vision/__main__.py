"""``python -m integrations.vision train | eval | analyse`` (see :mod:`integrations.vision.commands`)."""

from .commands import main

main()
