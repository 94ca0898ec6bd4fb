"""The daemon's data plane: shards (an event loop each) and their connections."""
