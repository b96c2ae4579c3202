"""lit_dp: differentially private fine-tuning of small causal LMs (DP-Adam-AC) on Lightning."""
