"""Next-item retrieval: the model, similarity (dot, MoL), losses, negatives, top-K, metrics, baselines, data and the training entry."""
