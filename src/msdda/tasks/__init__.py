"""Layer 5, tasks: embedded problems with their data, models and shipped weights (digits; the exact Gaussian oracle)."""
