"""Side-by-side benchmark of this project against Mitogen 0.3.54 and execnet 2.1.

``bench/run.py`` is the entry point; ``bench/report.py`` turns a run into ``RESULTS.md``.
"""
