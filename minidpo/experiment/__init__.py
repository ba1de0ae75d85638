"""The experiment train.py runs: cached stages (model, SFT, pairs, reference log-probs), resolving model names, and
training each method then comparing them. The top layer: imports everything, imported by nothing in minidpo."""
