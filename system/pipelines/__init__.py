"""Pipelines: a paper's recipe as a list of typed steps (steps.py) declared beside its methods
(alitok.py, semtok.py, eostok.py), joined by typed wiring (wiring.py). cluster/pipeline.py runs any
of them; this package names no Ray resource."""
