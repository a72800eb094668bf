"""Select: the assets that make outputs from the keep-lists (core/select): the deduplicated export,
the pruning selections, decontamination against a reference set and the robustness sweep.

They read the keep-lists and the stage files under the storage; they write `deduplicated/`, `pruned/`,
`contaminated/` and the robustness report, each at deterministic paths.
"""
