"""The ``hubload`` command line."""
