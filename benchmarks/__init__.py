"""lit_dp's benchmarks and studies, one subpackage per study (benchmarks/README.md lists them).

Every entry point runs as a module from the repository root, e.g.
``python -m benchmarks.utility.study1 --plan``; results go to ``benchmarks/results/``.
"""
