"""Training a run: the loop (train), its optimizers and schedule, SMART's terms, MNRL,
data-parallel processes, precision and threads, and the TensorBoard log."""
