"""The mealkd label store (Zarr v3): schema, writer (resumable, multi-process), validated reader.

See ``storage.schema`` for the layout and sharding choice, ``storage.writer`` for crash safety and
``storage.reader`` for the read paths.
"""
from mealkd.storage.encoding import decode_topk, encode_topk
from mealkd.storage.reader import LabelStore, dataset_difference, open_store, refuse_other_dataset, store_exists
from mealkd.storage.schema import FORMAT, VERSION, parse_encoding
from mealkd.storage.writer import StoreWriter, check_output, create_store

__all__ = [
    "FORMAT", "VERSION", "parse_encoding", "store_exists", "check_output", "create_store", "StoreWriter",
    "open_store", "dataset_difference", "refuse_other_dataset", "LabelStore", "encode_topk", "decode_topk",
]
