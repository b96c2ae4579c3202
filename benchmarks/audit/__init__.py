"""Privacy audits: canary exposure and membership inference on a tiny model (``canaries``), and
the one-run epsilon lower bound on the utility study's runs (``one_run``)."""
