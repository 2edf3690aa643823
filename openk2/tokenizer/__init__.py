"""K2's text interface: the tokenizer, the chat template and the tool-call parser."""

from openk2.tokenizer.chat import DEFAULT_SYSTEM_PROMPT, JINJA_TEMPLATE, ChatEncoding, encode_chat, render
from openk2.tokenizer.tokenizer import K2_PATTERN, SPECIAL_OFFSETS, IncrementalDecoder, K2Tokenizer
from openk2.tokenizer.toolcalls import (
    Delta,
    ParsedMessage,
    StreamingToolCallParser,
    ToolCall,
    assistant_message,
    parse_tool_calls,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "JINJA_TEMPLATE",
    "K2_PATTERN",
    "SPECIAL_OFFSETS",
    "ChatEncoding",
    "Delta",
    "IncrementalDecoder",
    "K2Tokenizer",
    "ParsedMessage",
    "StreamingToolCallParser",
    "ToolCall",
    "assistant_message",
    "encode_chat",
    "parse_tool_calls",
    "render",
]
