"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import pytest

from tests.e2e.service_processes import ServiceProcesses


@pytest.fixture
def service_factory(tmp_path):
    services = []

    def make(**kwargs) -> ServiceProcesses:
        services.append(ServiceProcesses(tmp_path, **kwargs))
        return services[-1]

    yield make
    for service in services:
        service.close()
