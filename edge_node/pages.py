"""GAZSI's two static pages, served as the reference serves them at ``/index.`` and ``/contacts.``."""

from __future__ import annotations

__all__ = ["CONTACTS_HTML", "INDEX_HTML"]

INDEX_HTML = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>GAZSI Cluster</title></head>
<body><h1>GAZSI Cluster edge node</h1>
<p>Text embeddings close to you. Try <a href="/inference?d=hello%20world">/inference?d=hello world</a>
or POST /v1/embeddings with an OpenAI client.</p></body></html>
"""

CONTACTS_HTML = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>GAZSI Cluster - contacts</title></head>
<body><h1>Contacts</h1><p>Operated by the GAZSI Cluster maintainers.</p></body></html>
"""
