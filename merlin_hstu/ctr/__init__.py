"""Click-through-rate models on tabular features: WuKong, DLRM, logistic regression; data and training entry."""
