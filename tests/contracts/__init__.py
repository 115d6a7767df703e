"""Behaviour every implementation of a protocol must show, written once and run against
each implementation (`MemoryBus`/`KafkaBus`, `LocalStore`/`S3Store`)."""

import pytest

# these modules are not test files: ask pytest to rewrite their asserts for clear failures
pytest.register_assert_rewrite("tests.contracts.bus_contract", "tests.contracts.store_contract")
