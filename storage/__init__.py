"""The mealkd label store (Zarr v3): schema, writer (resumable, multi-process), validated reader.

See ``storage.schema`` for the layout and sharding choice, ``storage.writer`` for crash safety and
``storage.reader`` for the read paths.
"""
from storage.encoding import decode_topk, encode_topk
from storage.errors import UserError
from storage.reader import LabelStore, open_store, store_exists
from storage.schema import FORMAT, VERSION, parse_encoding
from storage.writer import StoreWriter, create_store

__all__ = [
    "FORMAT", "VERSION", "parse_encoding", "store_exists", "create_store", "StoreWriter",
    "open_store", "LabelStore", "UserError", "encode_topk", "decode_topk",
]
