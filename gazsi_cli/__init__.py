"""The ``gazsi`` command line."""
