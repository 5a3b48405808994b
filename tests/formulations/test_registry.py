import pytest

from formulations import registry
from formulations.interface import Formulation
from formulations.plan import Plan


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown formulation 'nope'"):
        registry.create("nope")


def test_user_formulation_by_module_path():
    cls = registry.formulation_class("tests.formulations.test_registry:Idle")
    assert cls is Idle
    assert isinstance(registry.create("tests.formulations.test_registry:Idle"), Idle)


def test_bad_parameters_are_a_clear_error():
    with pytest.raises(ValueError, match="bad parameters"):
        registry.create("tests.formulations.test_registry:Idle", nonsense=1)


class Idle(Formulation):
    def plan(self, view):
        return Plan()
