"""Command-line tools (each also importable: ``from tools import dump_graph``)."""
