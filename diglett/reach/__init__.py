"""Reach: getting an agent's connection out of networks that only let HTTPS through.

The Noise session is the same on every transport; this package only carries its bytes: gateway
URLs (``tls://``, ``wss://``), the proxy an agent dials through (HTTP CONNECT, SOCKS5), the outer
TLS and WebSocket layers, and the splice that hands the tunnel code a plain socket. Outer TLS is
for getting through firewalls; the pinned server key stays the security.
"""
