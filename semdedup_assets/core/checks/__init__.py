"""Checks of a storage: what it should hold and whether what it holds is whole.

Reads: every stage file of a storage. Writes: nothing; layout's prune_* functions remove files
that no longer belong. Modules: layout (the expected storage), verify (`semdedup verify`).
"""
