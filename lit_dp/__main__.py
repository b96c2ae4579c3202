"""``python -m lit_dp`` == ``lit-dp``."""

from lit_dp.cli import main

main()
