"""Layer 2: asyncio Protocol and DatagramProtocol adapters."""
