"""When the engine runs out of something, the error says what and how to fix it.

Network addresses can be exhausted for real in a test: the engine hands out a few dozen
bridge subnets, then refuses. Disk, memory and process exhaustion go through the same
mapping (`engine.EXHAUSTION`), checked against the engine's own messages in the unit
tests; filling this machine's disk or memory is not something a test should do.
"""

from __future__ import annotations

import pytest

from stigmer_sandbox import engine, labels
from stigmer_sandbox.errors import EngineError

from .conftest import TEST_LABELS

MOST_NETWORKS = 200


def test_running_out_of_network_addresses_is_one_clear_line(docker_engine):
    made = []
    try:
        with pytest.raises(EngineError) as caught:
            for index in range(MOST_NETWORKS):
                with engine.engine_errors():
                    made.append(
                        docker_engine.networks.create(
                            f"stigmer-sandbox-exhaust-{index}",
                            labels={**labels.project_labels("network"), **TEST_LABELS},
                        )
                    )
        assert caught.value.message.startswith("Docker has no network addresses left")
        assert "docker network prune" in caught.value.hint
        assert "\n" not in str(caught.value)
        assert len(made) >= 1
    finally:
        for network in made:
            network.remove()
