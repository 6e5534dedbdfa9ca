"""`free_port`: a free port outside the range the kernel hands to outgoing connections and binds to port 0."""

import socket

from vitrine.services.stack import launcher


def test_free_ports_are_bindable_distinct_and_below_the_ephemeral_range() -> None:
    low = launcher._ephemeral_low()
    ports = [launcher.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(launcher.FREE_PORT_LOW <= port < low for port in ports)
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as child:
            child.bind(("127.0.0.1", port))


def test_a_taken_port_is_drawn_again(monkeypatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as spare:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        spare.bind(("127.0.0.1", 0))
        busy, free = taken.getsockname()[1], spare.getsockname()[1]
        spare.close()
        draws = iter([busy, busy, free])
        monkeypatch.setattr(launcher, "FREE_PORT_LOW", 1024)
        monkeypatch.setattr(launcher, "_ephemeral_low", lambda: 65_536)
        monkeypatch.setattr(launcher.random.SystemRandom, "randrange", lambda self, a, b: next(draws))
        assert launcher.free_port() == free
