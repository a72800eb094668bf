"""Stage 2, embed: one embedding per item, by an encoder or taken from the input.

Reads: a shard's raw index and its input rows (text, images or embeddings). Writes:
`embeddings/<shard>.parquet` (L2-normalised vectors), atomically. Modules: shard (embed_shard:
cache check, encode or validate, write), images (decoding in DataLoader workers), encoders/
(the Encoder protocol, registry, HF text, static model2vec and open_clip encoders).
"""
