from __future__ import annotations

from twin.mqtt.broker import Broker

from .conftest import Client, port_of, run_sync


async def test_pubsub_all_qos_v311_and_v5(broker: Broker) -> None:
    def scenario() -> None:
        for v5 in (False, True):
            sub = Client(port_of(broker), "sub", v5=v5)
            pub = Client(port_of(broker), "pub", v5=v5)
            for q in (0, 1, 2):
                assert [int(getattr(r, "value", r)) for r in sub.subscribe(f"t/{q}", q)] == [q]
            for q in (0, 1, 2):
                for sq in (0, 1, 2):
                    pub.publish(f"t/{sq}", f"{q}-{sq}".encode(), q)
                    m = sub.get()
                    assert m.topic == f"t/{sq}"
                    assert m.payload == f"{q}-{sq}".encode()
                    assert m.qos == min(q, sq)
            assert sub.sync(pub) == []
            sub.close()
            pub.close()

    await run_sync(scenario)
