"""Text in: strict streaming UTF-8 input, boundary-safe tokenization with byte offsets, segments, chat framing."""
