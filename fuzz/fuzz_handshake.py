"""atheris target: the Noise XK handshake of diglett.noise, on the server's and the agent's side.

Both sides use the golden transcript's fixed keys (tests/vectors/golden.json), ephemeral keys
included, so the genuine acts are fixed bytes the fuzzer can start from and mutate. The first
input byte picks the side: even, the server (Responder) reads act one from the next 50 bytes
and act three from the 66 after; odd, the agent (Initiator) reads act two from the rest.
Allowed outcome: success, or noise.HandshakeError.
"""

from common import golden_hex, instrumented, run

with instrumented():
    import coincurve

    from diglett import noise, wire

KEYS = {name: coincurve.PrivateKey(golden_hex("keys", name))
        for name in ("server_static_priv", "agent_static_priv", "agent_ephemeral_priv",
                     "server_ephemeral_priv")}
PROLOGUE = wire.prologue(golden_hex("handshake", "preamble"))
SERVER_PUB = golden_hex("keys", "server_static_pub")


def responder(data):
    side = noise.Responder(KEYS["server_static_priv"], PROLOGUE,
                           ephemeral_key=KEYS["server_ephemeral_priv"])
    side.read_act_one(data[:noise.ACT_ONE_SIZE])
    side.read_act_three(data[noise.ACT_ONE_SIZE:])
    side.handshake_hash, side.send_cipher, side.recv_cipher  # a completed handshake is whole


def initiator(data):
    side = noise.Initiator(KEYS["agent_static_priv"], SERVER_PUB, PROLOGUE,
                           ephemeral_key=KEYS["agent_ephemeral_priv"])
    side.act_one()
    side.read_act_two(data)
    side.handshake_hash, side.send_cipher, side.recv_cipher


def target(data):
    if not data:
        return
    try:
        (initiator if data[0] & 1 else responder)(data[1:])
    except noise.HandshakeError:
        pass


if __name__ == "__main__":
    run(target)
