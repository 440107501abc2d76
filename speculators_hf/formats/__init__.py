"""File formats several stages share, below every stage (layer 1): each module reads or describes one format.

A stage that needs a fact about another stage's files (the checkpoint's weight map and side files, regeneration
provenance, the data config, a chat template file) imports it from here, never from the other stage.
"""
