"""Using a trained run: dev metrics (evaluate), prediction files (predict), the error
analysis (analyze)."""
