"""Functions for children that must not import anything themselves (not even logging)."""

import sys


def loaded(name):
    """Whether module `name` is loaded in this process."""
    return name in sys.modules


def effective_level(logger_name):
    """The effective level of a logger here (this imports logging)."""
    import logging

    return logging.getLogger(logger_name).getEffectiveLevel()
