"""Empirical privacy audit of one training run (Steinke, Nasr and Jagielski 2023).

``estimator``: the one-run epsilon lower bound from canary scores and inclusion bits (numpy and
scipy only). ``canaries``: canary token rows for language models and their per-canary losses.
The Lightning side is ``lit_dp.callbacks.audit.AuditCanaries``.
"""
