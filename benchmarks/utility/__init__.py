"""Utility per epsilon: study 1 (``study1``: DP-Adam-AC's parts and baselines, with the clip-bound
supplement ``clip``), study 2 (``study2``: methods, schedules and compute allocations at equal
compute on a test split) and the paper's experiments at CPU scale (``paper_figures``)."""
