"""Declarative resources: documents parsed (``documents``), applied and exported through the
admin RPCs in one transaction (``apply``), and watched in a directory (``config_dir``)."""
