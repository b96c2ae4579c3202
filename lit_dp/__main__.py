"""``python -m lit_dp`` == ``lit-dp``."""

from lit_dp.commands import main

main()
