"""Raw RFC 822 e-mails to model input: the subject line and the readable body, whitespace-collapsed.

Used by the SpamAssassin long-document task. Headers other than the subject are dropped (they
identify the mail server and would let a classifier skip the text); a body with no text/plain part
falls back to its HTML parts with the markup removed by the standard library's HTML parser.
"""

from __future__ import annotations

import email
import email.header
import email.policy
from email.message import Message
from html.parser import HTMLParser


class _HtmlText(HTMLParser):
    """Collects the character data of an HTML document (tags, scripts' markup and attributes dropped)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _decoded(payload: bytes, charset: str | None) -> str:
    try:
        return payload.decode(charset or "latin-1", errors="replace")
    except LookupError:  # an unknown charset name in the header
        return payload.decode("latin-1", errors="replace")


def _subject(message: Message) -> str:
    """The subject with RFC 2047 encoded words decoded."""
    raw = message.get("subject", "")
    return "".join(
        _decoded(text, charset) if isinstance(text, bytes) else text
        for text, charset in email.header.decode_header(str(raw))
    )


def mail_text(raw: bytes) -> str:
    """Subject + body of one e-mail as a single whitespace-normalised string."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    plain: list[str] = []
    markup: list[str] = []
    for part in message.walk():
        kind = part.get_content_type()
        if not part.is_multipart() and kind in ("text/plain", "text/html"):
            payload = part.get_payload(decode=True)
            text = _decoded(payload, part.get_content_charset()) if isinstance(payload, bytes) else ""
            (plain if kind == "text/plain" else markup).append(text)
    if plain:
        body = "\n".join(plain)
    else:
        parser = _HtmlText()
        parser.feed("\n".join(markup))
        body = "".join(parser.parts)
    return " ".join(f"{_subject(message)}\n{body}".split())
