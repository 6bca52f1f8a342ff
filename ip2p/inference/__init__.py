"""Stage 4: editing photos with a trained pipeline."""
