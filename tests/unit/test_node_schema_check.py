"""Node.__init_subclass__ refuses a node whose run() parameters are not its declared inputs."""

from __future__ import annotations

import pytest

from plinth.nodes.core.registry import NODES
from plinth.nodes.core.schema import Float, Int, Link, Node, Output


def test_every_registered_node_passes_the_check():
    assert NODES  # the check ran when each class was defined; importing them all is the test


def test_a_node_whose_run_names_its_inputs_in_order_is_accepted():
    class Scale(Node):
        OUTPUTS = (Output("IMAGE"),)
        image = Link("IMAGE")
        factor = Float(default=1.0)
        steps = Int(default=1, optional=True)

        def run(self, ctx, image, factor, steps=1):
            return (image,)

    assert [spec.name for spec in Scale.schema.inputs] == ["image", "factor", "steps"]


def test_a_node_without_run_is_not_checked():
    class Declared(Node):
        value = Int()

    assert Declared.schema.inputs[0].name == "value"


def test_a_missing_parameter_is_named():
    with pytest.raises(TypeError, match=r"Forgetful\.run\(\).*missing factor"):

        class Forgetful(Node):
            image = Link("IMAGE")
            factor = Float()

            def run(self, ctx, image):
                return (image,)


def test_an_undeclared_parameter_is_named():
    with pytest.raises(TypeError, match=r"Eager\.run\(\).*not declared as inputs: strength"):

        class Eager(Node):
            image = Link("IMAGE")

            def run(self, ctx, image, strength=1.0):
                return (image,)


def test_missing_and_extra_are_both_named():
    with pytest.raises(TypeError, match=r"Renamed\.run\(\).*missing factor; not declared as inputs: scale"):

        class Renamed(Node):
            image = Link("IMAGE")
            factor = Float()

            def run(self, ctx, image, scale):
                return (image,)


def test_another_order_is_refused():
    with pytest.raises(TypeError, match=r"Shuffled\.run\(\).*another order than declared \(image, factor\)"):

        class Shuffled(Node):
            image = Link("IMAGE")
            factor = Float()

            def run(self, ctx, factor, image):
                return (image,)


def test_keyword_catch_all_is_refused():
    with pytest.raises(TypeError, match=r"Vague\.run\(\) must name each declared input, not take \*\*inputs"):

        class Vague(Node):
            image = Link("IMAGE")

            def run(self, ctx, **inputs):
                return (inputs["image"],)


def test_inherited_inputs_count_for_a_subclass():
    class Base(Node):
        image = Link("IMAGE")

        def run(self, ctx, image):
            return (image,)

    with pytest.raises(TypeError, match=r"Child\.run\(\).*missing factor"):

        class Child(Base):
            factor = Float()
