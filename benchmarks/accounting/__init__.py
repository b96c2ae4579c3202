"""Accounting: the PLD accountant's cost per training step and its epsilon against RDP's
(``accountants``)."""
