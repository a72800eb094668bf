"""Stage-independent I/O: the storage layout and the files every stage reads and writes.

Reads: input shards (Parquet, JSON Lines, WebDataset .tar, .npy; local or fsspec URLs) and any
stage file of a storage. Writes: stage files atomically (temporary file, then rename), under
the paths `storage` defines; the DuckDB catalog's views over them. Modules: storage (paths,
atomic writes, reads, safe shard keys), shards (input discovery and readers), webdataset, schemas
(the Arrow schema of every stage file), tables (Arrow <-> numpy), catalog (DuckDB views), recent (the
embeddings a run in one process just wrote, held for its k-means sample).
"""
