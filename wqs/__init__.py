"""WQS: a distributed key-value store for LLM KV-cache blocks.

    import wqs
    client = wqs.Client(["127.0.0.1:7070"])
    ids = wqs.prefix_block_ids(token_ids, block_tokens=256, namespace="llama-3-8b")
    hits = client.lookup_prefix(ids)
    blocks = client.get_many(ids[:hits])
"""

from wqs.asyncio_client import AsyncClient
from wqs.client import Client
from wqs.errors import WQSError
from wqs.ids import block_id_to_int, prefix_block_ids, to_block_id
from wqs.rpc.shm import SharedMemory

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "Client", "SharedMemory", "WQSError", "block_id_to_int", "prefix_block_ids",
    "to_block_id", "__version__",
]
