"""Alias kept for model repositories exported before the package split: their pickled serving graphs
(`ensemble.pkl`) name classes of `merlin_hstu.ctr_export`. New code imports `merlin_hstu.serving.ctr`."""
from merlin_hstu.serving.ctr import *  # noqa: F401,F403
from merlin_hstu.serving.ctr import CriteoWorkflowInline, PredictCTR, TorchScriptOp  # noqa: F401
