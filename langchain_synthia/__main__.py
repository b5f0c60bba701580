"""``python -m langchain_synthia`` runs the ``synthia`` command."""

from langchain_synthia.cli import main

main()
