"""Layer 5, tasks: embedded problems with their data, models and rewards (digits; the exact Gaussian oracle)."""
