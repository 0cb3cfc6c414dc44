"""What the demo prints when payment's sidecar could not have the ports it asked for."""

from __future__ import annotations

import io
from pathlib import Path

from sidecar.demo.mesh import SEED_PORTS, Mesh, Stack
from sidecar.demo.report import displaced_warning, print_summary


def _mesh(**displaced: int) -> Mesh:
    ports = {**SEED_PORTS, **displaced}
    payment = Stack(
        "payment", 4000, ports["outbound"], ports["inbound"], ports["admin"],
        Path("p.log"), Path("p-access.log"),
    )  # fmt: skip
    inventory = Stack("inventory", 4001, 4002, 4003, 4004, Path("i.log"), Path("i-access.log"))
    return Mesh(payment, inventory, Path("/tmp/demo"), dict(SEED_PORTS), displaced)


def test_no_warning_when_payment_has_the_seed_ports() -> None:
    assert displaced_warning(_mesh()) == ""


def test_a_displaced_outbound_port_is_boxed_with_the_base_url() -> None:
    lines = displaced_warning(_mesh(outbound=41234)).splitlines()
    assert "WARNING" in lines[0]
    assert len({len(line) for line in lines}) == 1  # a closed box
    text = "\n".join(lines)
    assert "port 8080 was busy: payment's sidecar outbound is on :41234" in text
    assert 'OpusClient("http://127.0.0.1:41234")' in text
    assert "OPUS_SIDECAR_URL=http://127.0.0.1:41234" in text


def test_another_displaced_port_is_boxed_without_a_base_url() -> None:
    text = displaced_warning(_mesh(admin=41235))
    assert "port 9090 was busy: payment's sidecar admin is on :41235" in text
    assert "OpusClient" not in text


def test_the_summary_repeats_the_box_and_always_gives_the_base_url() -> None:
    out = io.StringIO()
    print_summary(_mesh(outbound=41234), [], out, show_logs=False)
    assert displaced_warning(_mesh(outbound=41234)) in out.getvalue()
    out = io.StringIO()
    print_summary(_mesh(), [], out, show_logs=False)
    assert "WARNING" not in out.getvalue()
    assert 'OpusClient("http://127.0.0.1:8080")' in out.getvalue()
