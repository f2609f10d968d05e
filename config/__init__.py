"""Training configs for train.py: plain Python assignments to TrainConfig keys.

A package (not just a folder) so one config can inherit another with
`from config.<parent> import *` and so the name resolves here, never to some
installed module that happens to be called `config`.
"""
