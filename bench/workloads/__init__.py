"""Workload scripts, each run as ``python SCRIPT WORKLOAD PARAMS_JSON`` inside one venv.

They are scripts first (they import their sibling ``common`` from ``sys.path[0]``); this file
only lets the harness and the tests import ``bench.workloads.common``.
"""
