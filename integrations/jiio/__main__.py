"""``python -m integrations.jiio demo`` (see :mod:`integrations.jiio.commands`)."""

from .commands import main

main()
