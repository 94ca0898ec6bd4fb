"""The data plane between SDK and storage nodes: wire protocol, auth handshake, transports."""
