#!/usr/bin/env python3
"""Parse a delivery status notification with Python's standard email package.

Reads one message (header and body) from stdin and prints JSON describing it,
for tests to assert on (see pydsn.go). Only the standard library is used, so this is a
parser independent of the Go code under test.
"""

import email
import email.header
import email.utils
import json
import re
import sys

UNFOLD = re.compile(r"\r?\n(?=[ \t])")
UTF8_XTEXT = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def unfold(value):
    """Undo header folding: drop each line break that precedes white space."""
    return UNFOLD.sub("", str(value)).rstrip("\r\n")


def fields(msg):
    return [[k, unfold(v)] for k, v in msg.items()]


def typed(value, seven_bit):
    """Split "type; address" and undo the utf-8-addr-xtext form (RFC 6533)."""
    kind, _, addr = value.partition(";")
    kind, addr = kind.strip().lower(), addr.strip()
    if kind == "utf-8" and seven_bit:
        addr = UTF8_XTEXT.sub(lambda m: chr(int(m.group(1), 16)), addr)
    return [kind, addr]


def status_blocks(part):
    """The header blocks of a (global-)delivery-status part."""
    if part.get_content_type() == "message/delivery-status":
        blocks = part.get_payload()
    else:
        # Python does not know message/global-delivery-status and parses it
        # as an embedded message; give its text to the delivery-status
        # parser instead.
        inner = part.get_payload(0)
        text = "".join("%s: %s\r\n" % kv for kv in inner.items())
        text += "\r\n" + inner.get_payload()
        wrapper = email.message_from_string(
            "Content-Type: message/delivery-status\r\n\r\n" + text)
        blocks = wrapper.get_payload()
    return blocks


def main():
    data = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    msg = email.message_from_string(data)
    out = {"defects": []}
    for i, part in enumerate(msg.walk()):
        for d in part.defects:
            out["defects"].append("part %d: %s" % (i, type(d).__name__))

    out["headers"] = fields(msg)
    out["content_type"] = msg.get_content_type()
    out["report_type"] = msg.get_param("report-type")
    out["boundary"] = msg.get_boundary()
    name, addr = email.utils.parseaddr(unfold(msg.get("From", "")))
    out["from_name"] = str(email.header.make_header(email.header.decode_header(name)))
    out["from_addr"] = addr
    out["to_addr"] = email.utils.parseaddr(unfold(msg.get("To", "")))[1]
    date = email.utils.parsedate_to_datetime(unfold(msg["Date"]))
    out["date"] = date.isoformat()

    parts = msg.get_payload() if msg.is_multipart() else []
    out["parts"] = [
        {
            "content_type": p.get_content_type(),
            "cte": (p.get("Content-Transfer-Encoding") or "").lower(),
            "charset": p.get_content_charset(),
        }
        for p in parts
    ]

    for p in parts:
        ctype = p.get_content_type()
        if ctype == "text/plain":
            out["text"] = p.get_payload(decode=True).decode("utf-8")
        elif ctype in ("message/delivery-status", "message/global-delivery-status"):
            seven_bit = ctype == "message/delivery-status"
            blocks = status_blocks(p)
            out["per_message"] = fields(blocks[0]) if blocks else []
            out["recipients"] = []
            for b in blocks[1:]:
                group = {"fields": fields(b), "typed": {}}
                for name in ("Original-Recipient", "Final-Recipient"):
                    if b.get(name) is not None:
                        group["typed"][name] = typed(unfold(b[name]), seven_bit)
                out["recipients"].append(group)
        elif ctype == "text/rfc822-headers":
            payload = p.get_payload()
            out["returned_type"] = ctype
            out["returned_headers"] = fields(email.message_from_string(payload)) if payload else []
            out["returned_body"] = None
        elif ctype in ("message/rfc822", "message/global", "message/global-headers"):
            inner = p.get_payload(0)
            out["returned_type"] = ctype
            out["returned_headers"] = fields(inner)
            body = inner.get_payload()
            out["returned_body"] = body if isinstance(body, str) else None
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
