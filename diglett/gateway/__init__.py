"""The gateway's parts, each owning one job; diglett.server wires them and owns the lifecycle.

- listener: the agent port, admission before the handshake
- handshake: preamble, the Noise acts and the CONFIG record, under a deadline
- authorize: the pure decision whether a key may have a name (no I/O, unit-tested)
- ports: tunnel ports (pinned, the name's last one, or a fresh one)
- agent_session: one connected agent, its tunnel port and its Tunnel; ``snapshot()`` for readers
- limits: new streams per second, the memory budget
- events: session rows, outbox deliveries and signals, in that order
- fleet: the grant cache and the registry poller (revokes, kicks, takeovers), the heartbeat
"""
