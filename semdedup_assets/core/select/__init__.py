"""Stage 5, select: turn the keep-lists into datasets and selections.

Reads: keep-lists, dedup results, embeddings and the input rows. Writes: the deduplicated
dataset (export), pruned selections under `pruned/` (prune), `contaminated/` records against a reference set
(decontaminate) and the removed-set comparisons across k and encoders (robustness).
"""
