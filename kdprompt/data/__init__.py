"""Data: sources (CoOp layout, image folder, shards, synthetic), the CoOp protocol, shard I/O."""
