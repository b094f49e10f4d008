"""`ablate`: the ablation rows over seeds, their table, and the statistics behind it."""
