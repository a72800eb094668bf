"""Where the units of every stage run, and in what order.

Reads: Settings and the storage (through the stages it calls). Writes: nothing itself; the
stages it calls write their files. Modules: engines (the engine contract: Engine, Done, Worker,
EngineError), local_engine (in process), ray_engine (on a Ray cluster), parallel (map_batches:
batches over a thread pool), meter (time and memory per unit), loop (engine_for, ingest_shards,
run_units: ingest, embed, centroids, assign, dedup buckets, keep-lists).
"""
