"""The event loop each shard (and the synchronous engine facade) runs on."""
