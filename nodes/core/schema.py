"""How a node declares its inputs and outputs, once, as typed fields on its class.

The declaration is the single source for validation, ListNodes, `plinth nodes` and the docs
(InvokeAI's style): a node class lists its inputs as class attributes in ComfyUI's widget order
and its outputs in OUTPUTS. Nothing here imports torch, so schemas can be read cheaply.
"""

from __future__ import annotations

import builtins
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from plinth.nodes.core.context import NodeContext, ValidationEnv

# Types whose values are literals in the graph; every other type arrives through a link.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


@dataclass
class InputSpec:
    """One input of a node. `type` is a ComfyUI type name; `name` is set from the attribute."""

    type: str
    optional: bool = False
    tooltip: str = ""
    name: str = ""
    # The value an omitted input takes, where has_default says it has one (widgets redeclare it typed).
    default: Any = None

    def __set_name__(self, owner: builtins.type, name: str) -> None:
        self.name = name

    @property
    def is_link(self) -> bool:
        return self.type not in WIDGET_TYPES

    @property
    def has_default(self) -> bool:
        return False

    def check(self, value: Any, env: ValidationEnv) -> tuple[str, str] | None:
        """Return (code, reason) when `value` is not acceptable for this input, else None."""
        return None

    def coerce(self, value: Any) -> Any:
        """The value as the node receives it (after check passed)."""
        return value

    def files(self, value: Any, env: ValidationEnv) -> list[tuple[str, str]]:
        """(source, name) of every model file or input image a valid `value` names: their
        fingerprints join the node's cache key, so a file replaced under its name is read anew."""
        return []


@dataclass
class Link(InputSpec):
    """An input that only a link can fill: MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE, ..."""


@dataclass
class Int(InputSpec):
    type: str = "INT"
    default: int = 0
    min: int = -(2**63)
    max: int = 2**63 - 1
    step: int = 1
    control_after_generate: bool = False
    # What the server's request limits count this input as: "width"/"height" (pixels, their
    # product against max_pixels), "steps" or "batch". Empty: no limit beyond min/max.
    limit: str = ""

    @property
    def has_default(self) -> bool:
        return True

    def check(self, value: Any, env: ValidationEnv) -> tuple[str, str] | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "invalid_input_type", f"expected an integer, got {type(value).__name__} {value!r}"
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return "invalid_input_type", f"expected an integer, got {value!r}"
        return _check_range(int(value), self.min, self.max)

    def coerce(self, value: Any) -> int:
        return int(value)


@dataclass
class Float(InputSpec):
    type: str = "FLOAT"
    default: float = 0.0
    min: float = -math.inf
    max: float = math.inf
    step: float = 0.01
    round: float | None = None

    @property
    def has_default(self) -> bool:
        return True

    def check(self, value: Any, env: ValidationEnv) -> tuple[str, str] | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "invalid_input_type", f"expected a number, got {type(value).__name__} {value!r}"
        if not math.isfinite(value):
            return "invalid_input_type", f"expected a finite number, got {value!r}"
        return _check_range(value, self.min, self.max)

    def coerce(self, value: Any) -> float:
        return float(value)


@dataclass
class String(InputSpec):
    type: str = "STRING"
    default: str = ""
    multiline: bool = False

    @property
    def has_default(self) -> bool:
        return True

    def check(self, value: Any, env: ValidationEnv) -> tuple[str, str] | None:
        if not isinstance(value, str):
            return "invalid_input_type", f"expected a string, got {type(value).__name__} {value!r}"
        return None


@dataclass
class Boolean(InputSpec):
    type: str = "BOOLEAN"
    default: bool = False

    @property
    def has_default(self) -> bool:
        return True

    def check(self, value: Any, env: ValidationEnv) -> tuple[str, str] | None:
        if not isinstance(value, bool):
            return "invalid_input_type", f"expected true or false, got {value!r}"
        return None


@dataclass
class Choice(InputSpec):
    """A choice list: fixed `options`, or a dynamic `source` the server resolves
    ("checkpoints" for model files, "input_images" for the request's images)."""

    type: str = "COMBO"
    options: Sequence[str] = ()
    source: str = ""
    default: str | None = None
    image_upload: bool = False

    @property
    def has_default(self) -> bool:
        return self.default is not None

    def choices(self, env: ValidationEnv | None) -> list[str]:
        if self.source:
            return env.choices(self.source) if env is not None else []
        return list(self.options)

    def check(self, value: Any, env: ValidationEnv) -> tuple[str, str] | None:
        if not isinstance(value, str):
            return "invalid_input_type", f"expected one of the choices as a string, got {value!r}"
        choices = self.choices(env)
        if value not in choices:
            shown = ", ".join(choices[:20]) + (f", ... ({len(choices)} in all)" if len(choices) > 20 else "")
            what = (
                "value not in the choice list"
                if not self.source
                else "unknown input image"
                if self.source == "input_images"
                else f"unknown model in {self.source}/"
            )
            return "value_not_in_list", f"{what} {value!r}; choices: {shown or '(none)'}"
        return None

    def files(self, value: Any, env: ValidationEnv) -> list[tuple[str, str]]:
        return [(self.source, value)] if self.source else []


def _check_range(value: float, lo: float, hi: float) -> tuple[str, str] | None:
    if value < lo:
        return "value_smaller_than_min", f"{value} is smaller than the minimum {lo}"
    if value > hi:
        return "value_bigger_than_max", f"{value} is bigger than the maximum {hi}"
    return None


@dataclass(frozen=True)
class Output:
    type: str
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.type


@dataclass
class NodeSchema:
    """What a node class declares, gathered by Node.__init_subclass__."""

    class_type: str
    display_name: str
    category: str
    description: str
    inputs: list[InputSpec] = field(default_factory=list)
    outputs: tuple[Output, ...] = ()
    output_node: bool = False
    origin: str = "ComfyUI"

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)


class Node:
    """Base of every node. Subclasses declare inputs as class attributes and implement run().

    run(ctx, **inputs) receives literal inputs coerced to their Python types and linked inputs
    as the upstream node's output value, and returns a tuple with one value per OUTPUTS entry.
    Output nodes return a dict of UI results instead (e.g. {"images": [ImageRef, ...]}).

    Each node's run() names its declared inputs as typed parameters, in declaration order;
    defining a class whose run() misses one, adds one or reorders them raises TypeError, so a
    node cannot drift from its schema. For the type checker the base declares run only as
    `Callable[..., Any]`: no single base signature fits every node's parameters, and a typed
    base would make every override "incompatible with the supertype".
    """

    CLASS_TYPE: ClassVar[str] = ""
    DISPLAY_NAME: ClassVar[str] = ""
    CATEGORY: ClassVar[str] = ""
    OUTPUTS: ClassVar[tuple[Output, ...]] = ()
    OUTPUT_NODE: ClassVar[bool] = False
    # The node reads the whole graph (ComfyUI's hidden "prompt" input), e.g. to embed it in a
    # PNG: the graph is then part of its cache key.
    USES_GRAPH: ClassVar[bool] = False
    # Whose node this is: "ComfyUI" (a core node, same name, inputs and meaning), the custom
    # node pack whose class_type it keeps, or "Plinth" for nodes of its own.
    ORIGIN: ClassVar[str] = "ComfyUI"
    schema: ClassVar[NodeSchema]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inputs: dict[str, InputSpec] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, InputSpec):
                    inputs[name] = value
        class_type = cls.CLASS_TYPE or cls.__name__
        cls.schema = NodeSchema(
            class_type=class_type,
            display_name=cls.DISPLAY_NAME or class_type,
            category=cls.CATEGORY,
            description=" ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()),
            inputs=list(inputs.values()),
            outputs=tuple(cls.OUTPUTS),
            output_node=cls.OUTPUT_NODE,
            origin=cls.ORIGIN,
        )
        if cls.run is not Node.run:
            _check_run_parameters(cls, [spec.name for spec in cls.schema.inputs])

    if TYPE_CHECKING:
        run: Callable[..., Any]
    else:

        def run(self, ctx: NodeContext, **inputs: Any) -> Any:
            raise NotImplementedError

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        """Checks across literal inputs, as (input, code, reason); run after per-input checks."""
        return []


def _check_run_parameters(cls: type[Node], declared: list[str]) -> None:
    """TypeError unless cls.run takes (self, ctx, <each declared input by name, in order>)."""
    parameters = list(inspect.signature(cls.run).parameters.values())[2:]
    variadic = [
        ("*" if p.kind == p.VAR_POSITIONAL else "**") + p.name
        for p in parameters
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if variadic:
        raise TypeError(f"{cls.__name__}.run() must name each declared input, not take {variadic[0]}")
    names = [p.name for p in parameters]
    missing = [name for name in declared if name not in names]
    extra = [name for name in names if name not in declared]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += [f"not declared as inputs: {', '.join(extra)}"] if extra else []
    if not problems and names != declared:
        problems = [f"in another order than declared ({', '.join(declared)})"]
    if problems:
        raise TypeError(
            f"{cls.__name__}.run() parameters after self and ctx must be its declared inputs: {'; '.join(problems)}"
        )
