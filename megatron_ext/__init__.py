"""NSMLA extensions to megatron-core: config, sparse MLA attention, native indexer, layer specs."""
