"""Where the units of every stage run, and in what order.

Reads: Settings and the storage (through the stages it calls). Writes: nothing itself; the
stages it calls write their files. Modules: engines (the engine contract, the local engine in
process and the Ray engine), parallel (map_batches: batches over a thread pool), meter (time and
memory per unit), loop (run_units: ingest, embed, centroids, assign, dedup buckets, keep-lists).
"""
