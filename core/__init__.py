"""The processing core: conversations, rules and the interfaces of the backends.

Nothing here knows about ASGI, sockets, Redis or HTTP; the gateway turns frames into calls on
this package and events from it into frames.
"""
