"""Step time and memory: DP training's step against non-private training and Opacus
(``compare``), end to end through ``lit-dp fit`` (``fit_speed``), the secure noise mode
(``secure_noise``) and banded-MF correlated noise (``bandmf``)."""
