"""Alias kept for model repositories exported before the package split: their pickled serving graphs
(`ensemble.pkl`) name classes of `merlin_hstu.ranking_export`. New code imports `merlin_hstu.serving.ranking`."""
from merlin_hstu.serving.ranking import *  # noqa: F401,F403
from merlin_hstu.serving.ranking import PredictRanking, RankingRequestEncoder  # noqa: F401
