"""Services: what runs on a connection (echo, chat), over any transport netlib adapts.

A service gets a ``MessageStream`` or datagrams from an adapter and never touches a
transport; each service is a module or a package of its own, and services do not import
each other (the room hub is shared).
"""
