"""Run Python functions in contexts on other hosts and accounts, with nothing installed there.

A context is a Python interpreter started on some host or account (local, fork, ssh, sudo, ...)
and bootstrapped over its standard input with :mod:`mitogen.core`. Contexts form a tree rooted
at the master, the process that imported :mod:`mitogen.master`; messages between them are
routed through the tree. The public API follows Mitogen 0.3 so that programs written for it
run unchanged.

The globals below describe this process's place in the tree. A child overwrites them while it
boots, before any user code runs.
"""

from __future__ import annotations

__all__ = ["__version__", "context_id", "is_master", "main", "parent_id", "parent_ids"]

#: Version tuple, as Mitogen publishes it.
__version__ = (0, 3, 54)
__version_str__ = "0.3.54"

#: True in the master, the root of the tree.
is_master = True
#: This process's context ID: 0 in the master.
context_id = 0
#: The parent's context ID, or None in the master.
parent_id = None
#: Context IDs of every ancestor, nearest first; empty in the master.
parent_ids: list = []


def main(log_level="INFO", profiling=None):
    """Decorate a script's entry point to run it with a fresh Router.

    The decorated function must live in ``__main__``: it is called at once with the router as
    its only argument, and the router is shut down afterwards whatever happens. With
    `profiling` (by default: whether ``MITOGEN_PROFILING`` is set), the router and every
    context it starts are profiled (see :mod:`mitogen.profiling`).
    """

    def wrapper(func):
        if func.__module__ != "__main__":
            return func
        import os

        import mitogen.master
        import mitogen.utils

        mitogen.utils.log_to_file(level=log_level)
        if profiling or (profiling is None and os.environ.get("MITOGEN_PROFILING")):
            mitogen.master.Router.profiling = True
        return mitogen.utils.run_with_router(func)

    return wrapper
