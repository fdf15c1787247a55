"""Sequence encoders and interaction towers: the STU layer and stack (HSTU), SASRec, WuKong."""
