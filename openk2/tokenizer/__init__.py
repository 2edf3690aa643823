"""K2's text interface: the tokenizer, the chat templates, the tool-call and reasoning parsers."""

from openk2.tokenizer.chat import (
    DEFAULT_SYSTEM_PROMPT,
    JINJA_TEMPLATE,
    THINKING_JINJA_TEMPLATE,
    ChatEncoding,
    encode_chat,
    normalize_tool_call_ids,
    render,
    render_jinja,
)
from openk2.tokenizer.reasoning import StreamingReasoningParser, split_reasoning
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
    "THINKING_JINJA_TEMPLATE",
    "ParsedMessage",
    "StreamingReasoningParser",
    "StreamingToolCallParser",
    "ToolCall",
    "assistant_message",
    "encode_chat",
    "normalize_tool_call_ids",
    "parse_tool_calls",
    "render",
    "render_jinja",
    "split_reasoning",
]
