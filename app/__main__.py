"""``python -m app`` is the ``rdserve`` console script."""

from app.cli import main

main()
