"""Generative ranking: DLRM-HSTU, multi-task batches and losses, M-FALCON, stochastic length, metrics, baselines, data and the training entry."""
