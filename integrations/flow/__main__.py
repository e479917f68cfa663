"""``python -m integrations.flow train | eval | demo`` (see :mod:`integrations.flow.commands`)."""

from .commands import main

main()
