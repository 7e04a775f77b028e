"""Data: WebDataset shards on any fsspec URL, a resumable streaming reader, the embedded photo set."""
from system.data.embedded import ensure_embedded_dataset
from system.data.stream import ShardReader, TokenShardReader
from system.data.shards import (
    ShardPlan,
    find_classes,
    list_split,
    pending_shards,
    plan_shards,
    read_index,
    write_index,
    write_shard,
)
from system.data.storage import StorageError, filesystem, storage_options
from system.data.tokens import write_token_set
from system.data.transforms import center_crop_arr, to_tensor

__all__ = [
    "ShardReader", "TokenShardReader", "write_token_set", "ensure_embedded_dataset", "ShardPlan", "find_classes", "list_split", "pending_shards",
    "plan_shards", "read_index", "write_index", "write_shard", "StorageError", "filesystem",
    "storage_options", "center_crop_arr", "to_tensor",
]
