"""What every engine shares: the round (:mod:`spafl.runtime.round`), the run directory's files
(:mod:`spafl.runtime.record`) and the federation set-up (:mod:`spafl.runtime.federation`).

Importing this package imports nothing heavy: ``spafl.runtime.record`` needs no torch.
"""
