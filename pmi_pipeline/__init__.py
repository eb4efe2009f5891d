"""pmi-pipeline: label embeddings from the label PMI matrix, counted and factorized out of core.

Stages, one module each: :mod:`shards` (read and validate annotation shards), :mod:`cooccurrence` (blockwise label
and pair counts, additive), :mod:`pmi` (PMI variants), :mod:`factorize` (randomized eigendecomposition on Dask),
:mod:`store` (versioned Zarr embedding store), :mod:`embed` (the stages composed), plus importers, training and
evaluation. Nothing here imports Prefect: the flows in ``flows/`` wire these functions together.
"""

from __future__ import annotations

__version__ = "0.1.0"
