from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeSchema]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeSchema, _Mapping]]] = ...) -> None: ...

class InputSchema(_message.Message):
    __slots__ = ("name", "type", "required", "default_json", "min", "max", "step", "choices", "multiline", "control_after_generate", "image_upload", "tooltip")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    MULTILINE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_AFTER_GENERATE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_UPLOAD_FIELD_NUMBER: _ClassVar[int]
    TOOLTIP_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    required: bool
    default_json: str
    min: float
    max: float
    step: float
    choices: _containers.RepeatedScalarFieldContainer[str]
    multiline: bool
    control_after_generate: bool
    image_upload: bool
    tooltip: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., required: _Optional[bool] = ..., default_json: _Optional[str] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., step: _Optional[float] = ..., choices: _Optional[_Iterable[str]] = ..., multiline: _Optional[bool] = ..., control_after_generate: _Optional[bool] = ..., image_upload: _Optional[bool] = ..., tooltip: _Optional[str] = ...) -> None: ...

class OutputSchema(_message.Message):
    __slots__ = ("name", "type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ...) -> None: ...

class NodeSchema(_message.Message):
    __slots__ = ("class_type", "display_name", "category", "description", "output_node", "inputs", "outputs", "origin")
    CLASS_TYPE_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NODE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    class_type: str
    display_name: str
    category: str
    description: str
    output_node: bool
    inputs: _containers.RepeatedCompositeFieldContainer[InputSchema]
    outputs: _containers.RepeatedCompositeFieldContainer[OutputSchema]
    origin: str
    def __init__(self, class_type: _Optional[str] = ..., display_name: _Optional[str] = ..., category: _Optional[str] = ..., description: _Optional[str] = ..., output_node: _Optional[bool] = ..., inputs: _Optional[_Iterable[_Union[InputSchema, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[OutputSchema, _Mapping]]] = ..., origin: _Optional[str] = ...) -> None: ...
