"""Stage 3, cluster: spherical k-means centroids and each item's nearest centroid.

Reads: the embeddings of every shard (a per-shard sample for k-means). Writes: the centroids
(`centroids/centroids.parquet`) and `cluster_assignments/<shard>.parquet` (cluster and
similarity to its centroid per item). Modules:
kmeans, centroids (train_centroids / load_centroids), assign.
"""
