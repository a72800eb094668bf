"""Stage 4, dedup: the SemDeDup rule inside each cluster, then the keep-lists per eps.

Reads: cluster assignments and embeddings, bucketed by cluster. Writes:
`semantic_duplicates/bucket-*.parquet` (max_sim and duplicate_of per item) and
`keep_lists/` (eps=*.parquet, eps_curve.parquet). Modules: ordering
(cluster order, ties by id), pairwise (the tiled rule), multiprobe (--probes P), buckets
(dedup_bucket: one memory bucket through the rule), keep (keep masks, eps curve, keep-lists),
boundary (pairs just above / below each 1 - eps).
"""
