#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into DIR/<target>/ (default fuzz/corpus), built
from tests/fixtures, the shipped configs and a few hand-made inputs. Seeds are small and
regenerated on every run, so nothing binary is committed. Each target reads one or two leading
selector bytes (see its source); the seeds set them to reach every parser shape."""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "fuzz" / "corpus"

# (kind, endpoint) in the order of SHAPES in provider_response.rs / provider_request.rs.
SHAPES = ["openai/chat", "openai/responses", "compatible/chat", "anthropic/messages",
          "copilot/chat", "copilot/responses"]


def selector(shape, streaming):
    """The first byte that picks SHAPES[shape] (byte % len) and streaming (bit 7)."""
    index = SHAPES.index(shape)
    return next(b for b in range(256)
                if b % len(SHAPES) == index and bool(b & 0x80) == streaming)


def write(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def crlf(b):
    return b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def fixture(name):
    return (FIXTURES / name).read_bytes()


RESPONSES = {
    "openai-chat.json": (["openai/chat", "compatible/chat", "copilot/chat"], False),
    "openai-chat-stream.sse": (["openai/chat", "compatible/chat", "copilot/chat"], True),
    "openai-chat-tools-stream.sse": (["openai/chat", "copilot/chat"], True),
    "openai-responses.json": (["openai/responses", "copilot/responses"], False),
    "openai-responses-stream.sse": (["openai/responses", "copilot/responses"], True),
    "anthropic-messages.json": (["anthropic/messages"], False),
    "anthropic-messages-stream.sse": (["anthropic/messages"], True),
    "openai-error-ratelimit.json": (["openai/chat"], False),
    "anthropic-error-overloaded.json": (["anthropic/messages"], False),
}

for name, (shapes, streaming) in RESPONSES.items():
    body = fixture(name)
    stem = name.rsplit(".", 1)[0]
    for shape in shapes:
        tag = shape.replace("/", "-")
        write("provider_response", f"{stem}-{tag}", bytes([selector(shape, streaming), 7]) + body)
    if streaming:
        write("provider_response", f"{stem}-crlf",
              bytes([selector(shapes[0], True), 3]) + crlf(body))
        # The SSE parser with the default-ish and a tiny event limit (the second byte scales it).
        write("sse", f"{stem}", bytes([5, 255]) + body)
        write("sse", f"{stem}-small-limit", bytes([9, 8]) + body)
        write("sse", f"{stem}-crlf", bytes([1, 255]) + crlf(body))
write("sse", "bom-comments-cr", bytes([2, 40]) +
      b"\xef\xbb\xbf: keep-alive\revent: ping\rdata: a\r\rdata:b\ndata\n\nid: 1\nretry: 5\n\n")

CHAT = {"model": "gpt-4o", "stream": True, "max_tokens": 64,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                           "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}
RESPONSES_REQ = {"model": "gpt-5", "stream": True, "max_output_tokens": 100,
                 "input": [{"role": "user", "content": [{"type": "input_text", "text": "run"}]},
                           {"type": "function_call_output", "call_id": "call_1", "output": "ok"}]}
MESSAGES = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True,
            "metadata": {"user_id": "user_abc_account__session_1234"},
            "messages": [{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"},
                {"type": "text", "text": "go on"}]}]}
for shape, body in [("openai/chat", CHAT), ("compatible/chat", CHAT), ("copilot/chat", CHAT),
                    ("openai/responses", RESPONSES_REQ), ("copilot/responses", RESPONSES_REQ),
                    ("anthropic/messages", MESSAGES)]:
    tag = shape.replace("/", "-")
    write("provider_request", tag, bytes([selector(shape, False)]) + json.dumps(body).encode())
write("provider_request", "chat-usage-asked", bytes([0]) + json.dumps(
    dict(CHAT, stream_options={"include_usage": True})).encode())
write("provider_request", "chat-options-not-object", bytes([0]) + json.dumps(
    dict(CHAT, stream_options=3)).encode())

HEADS = [
    b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
    b"Proxy-Authorization: Basic dG9sbGdhdGU6dGdfc2VjcmV0\r\n\r\n\x16\x03\x01",
    b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n",
    b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nProxy-Authorization: Bearer x\r\n\r\n",
    b"CONNECT example.com.:443 HTTP/1.0\r\n\r\n",
    b"GET http://example.com/v1/models HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"POST /openai/v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"10.0.0.0/8",
    b"fd00::/8",
    b"\x7f\x00\x00\x01",
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\xa9\xfe\xa9\xfe",
]
for i, head in enumerate(HEADS):
    write("proxy_head", f"{i}", bytes([i * 37 % 256]) + head)



def openssl_hello(name, tls12_only=False):
    """The ClientHello Python's ssl module (OpenSSL) writes for `name` (None: no SNI)."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def reframe(record, size):
    """The same handshake message in TLS records of `size` bytes each."""
    message, out = record[5:], b""
    for i in range(0, len(message), size):
        piece = message[i:i + size]
        out += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
    return out


HELLOS = [
    openssl_hello("api.openai.com"),
    openssl_hello("API.Anthropic.com."),
    openssl_hello(None),
    openssl_hello("example.com", tls12_only=True),
]
HELLOS += [reframe(HELLOS[0], 64), reframe(HELLOS[1], 7)]
HELLOS += [HELLOS[0] + b"\x14\x03\x03\x00\x01\x01", b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x00"]
for i, hello in enumerate(HELLOS):
    write("client_hello", f"{i}", bytes([i * 53 % 256]) + hello)
write("client_hello", "name", bytes([1]) + b"API.OpenAI.COM.")

QUERIES = [
    'initiator:me provider:openai model:gpt-4o client:"Claude Code" session_id:s1',
    "started_after:2025-01-01T00:00:00Z started_before:2025-02-01T00:00:00+01:00",
    'model:"a b" initiator:alice',
    'client:"open',
    "color:red",
    "model:a model:b",
    "started_after:0000-01-01T00:00:00+23:59",
]
for i, q in enumerate(QUERIES):
    write("query_filter", f"{i}", q.encode())

for path in [ROOT / "config" / "tollgate.example.toml", ROOT / "config" / "tollgate.toml"]:
    write("config", path.stem, path.read_bytes())
write("config", "env-overrides",
      b'[server]\ngateway_listen = "127.0.0.1:0"\n\0TOLLGATE_DATABASE__URL=sqlite::memory:\n'
      b"TOLLGATE_LIMITS__MAX_BODY_BYTES=12\nTOLLGATE_PROVIDERS__X__KIND=openai\n")
write("config", "problems",
      b'[server]\ngateway_listen = "nope"\n[limits]\nrequests_per_minute = "many"\n'
      b'[keys]\ncentral_api_key_enabled = false\nallow_user_api_key = false\n')
