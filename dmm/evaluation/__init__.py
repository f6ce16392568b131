"""Evaluation: sampling on shared prompts and seeds, style accuracy, Frechet distances."""
