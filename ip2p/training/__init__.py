"""Stage 3: training (the flags, the pairs, the encoders and latent cache, the loop and what keeps it safe)."""
