"""Client-level differential privacy: clipping, Gaussian noise, an accountant."""
