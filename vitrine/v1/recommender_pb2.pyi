from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Context(_message.Message):
    __slots__ = ("page", "item_id", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    page: str
    item_id: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, page: _Optional[str] = ..., item_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "context", "exclude_item_ids", "request_id", "explain")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    context: Context
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    explain: bool
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., explain: _Optional[bool] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "variant", "explained_by")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_BY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    variant: str
    explained_by: str
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., variant: _Optional[str] = ..., explained_by: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "variant", "model_name", "model_version", "degraded", "degraded_reason", "request_id", "features_ts_ms", "explanation_unavailable")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_TS_MS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    variant: str
    model_name: str
    model_version: str
    degraded: bool
    degraded_reason: str
    request_id: str
    features_ts_ms: int
    explanation_unavailable: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., variant: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., degraded_reason: _Optional[str] = ..., request_id: _Optional[str] = ..., features_ts_ms: _Optional[int] = ..., explanation_unavailable: _Optional[str] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecommendRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RecommendRequest, _Mapping]]] = ...) -> None: ...

class RecommendBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[RecommendResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[RecommendResponse, _Mapping]]] = ...) -> None: ...

class Variant(_message.Message):
    __slots__ = ("name", "model_name", "model_version", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_name: str
    model_version: str
    weight: int
    def __init__(self, name: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("name", "salt", "variants", "revision", "updated_by", "updated_at_ms", "mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BY_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    salt: str
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    revision: int
    updated_by: str
    updated_at_ms: int
    mode: str
    def __init__(self, name: _Optional[str] = ..., salt: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., revision: _Optional[int] = ..., updated_by: _Optional[str] = ..., updated_at_ms: _Optional[int] = ..., mode: _Optional[str] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetExperimentRequest(_message.Message):
    __slots__ = ("experiment", "expected_revision")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    expected_revision: int
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...
