"""Reliable messaging over UDP, sans-I/O.

``wire`` (packet and frame codec, limits), ``recovery`` (RTT estimator, probe timeout,
congestion window), ``connection`` (``ReliableConnection``: one connection's state machine),
``endpoint`` (``ReliableServerCore``: one server socket's handshakes, connections and timers)
and ``simulation`` (a seeded lossy link and virtual clock that drive the cores without
sockets). See docs/design.md, "Reliable UDP".
"""
