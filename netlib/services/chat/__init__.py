"""The chat service: rooms and nicknames (``ChatService``), over TCP and UDP."""

from netlib.services.chat.service import (
    ChatLimits,
    ChatService,
    ChatServiceStatistics,
)
from netlib.services.chat.tcp import ChatProtocol, make_chat_handler
from netlib.services.chat.udp import DatagramChatProtocol

__all__ = [
    "ChatLimits",
    "ChatProtocol",
    "ChatService",
    "ChatServiceStatistics",
    "DatagramChatProtocol",
    "make_chat_handler",
]
