"""Model parallelism for the last FC layer: W [C, d] split by class over the ranks of a process group,
with a distributed softmax cross-entropy, exact top-k over shards and re-shardable checkpoints."""
from sicot.parallel.sharded_classifier import ShardedClassifier, init_rows, shard_range

__all__ = ["ShardedClassifier", "init_rows", "shard_range"]
