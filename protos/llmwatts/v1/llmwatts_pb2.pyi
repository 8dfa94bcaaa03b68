from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "greedy", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    greedy: bool
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., greedy: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "run_id", "prompts", "max_new_tokens", "sampling", "ignore_eos", "return_token_ids", "client_send_ns", "run_secret")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SEND_NS_FIELD_NUMBER: _ClassVar[int]
    RUN_SECRET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    run_id: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    max_new_tokens: int
    sampling: SamplingParams
    ignore_eos: bool
    return_token_ids: bool
    client_send_ns: int
    run_secret: str
    def __init__(self, request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., ignore_eos: _Optional[bool] = ..., return_token_ids: _Optional[bool] = ..., client_send_ns: _Optional[int] = ..., run_secret: _Optional[str] = ...) -> None: ...

class ServerTimes(_message.Message):
    __slots__ = ("received_ns", "batch_start_ns", "first_token_ns", "done_ns")
    RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    BATCH_START_NS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    DONE_NS_FIELD_NUMBER: _ClassVar[int]
    received_ns: int
    batch_start_ns: int
    first_token_ns: int
    done_ns: int
    def __init__(self, received_ns: _Optional[int] = ..., batch_start_ns: _Optional[int] = ..., first_token_ns: _Optional[int] = ..., done_ns: _Optional[int] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("index", "text", "prompt_tokens", "output_tokens", "finish_reason", "token_ids")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "run_id", "batch_id", "completions", "times", "energy_j", "energy_simulated")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SIMULATED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    run_id: str
    batch_id: str
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    times: ServerTimes
    energy_j: float
    energy_simulated: bool
    def __init__(self, request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., times: _Optional[_Union[ServerTimes, _Mapping]] = ..., energy_j: _Optional[float] = ..., energy_simulated: _Optional[bool] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("index", "token_ids", "text", "token_server_ns")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SERVER_NS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    token_server_ns: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., token_server_ns: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("request_id", "batch_id", "step", "deltas", "server_ns", "done", "final", "first_step")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    SERVER_NS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    batch_id: str
    step: int
    deltas: _containers.RepeatedCompositeFieldContainer[TokenDelta]
    server_ns: int
    done: bool
    final: GenerateResponse
    first_step: int
    def __init__(self, request_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., step: _Optional[int] = ..., deltas: _Optional[_Iterable[_Union[TokenDelta, _Mapping]]] = ..., server_ns: _Optional[int] = ..., done: _Optional[bool] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ..., first_step: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("index", "uuid", "name", "node", "rank", "memory_total_bytes", "simulated")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    node: str
    rank: int
    memory_total_bytes: int
    simulated: bool
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., node: _Optional[str] = ..., rank: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., simulated: _Optional[bool] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("model", "dtype", "devices", "gpus", "shard_count", "engine", "power_source", "versions", "max_batch_size", "max_new_tokens_limit", "context_length", "default_max_new_tokens", "server_id", "server_time_ns", "node", "telemetry_hz")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    POWER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_HZ_FIELD_NUMBER: _ClassVar[int]
    model: str
    dtype: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    shard_count: int
    engine: str
    power_source: str
    versions: _containers.ScalarMap[str, str]
    max_batch_size: int
    max_new_tokens_limit: int
    context_length: int
    default_max_new_tokens: int
    server_id: str
    server_time_ns: int
    node: str
    telemetry_hz: int
    def __init__(self, model: _Optional[str] = ..., dtype: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., shard_count: _Optional[int] = ..., engine: _Optional[str] = ..., power_source: _Optional[str] = ..., versions: _Optional[_Mapping[str, str]] = ..., max_batch_size: _Optional[int] = ..., max_new_tokens_limit: _Optional[int] = ..., context_length: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., server_id: _Optional[str] = ..., server_time_ns: _Optional[int] = ..., node: _Optional[str] = ..., telemetry_hz: _Optional[int] = ...) -> None: ...

class BeginRunRequest(_message.Message):
    __slots__ = ("run_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EndRunRequest(_message.Message):
    __slots__ = ("run_id", "run_secret")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    run_secret: str
    def __init__(self, run_id: _Optional[str] = ..., run_secret: _Optional[str] = ...) -> None: ...

class RunMarker(_message.Message):
    __slots__ = ("run_id", "server_ns", "energy_j", "simulated", "run_secret", "pending_requests")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_NS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    RUN_SECRET_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    server_ns: int
    energy_j: float
    simulated: bool
    run_secret: str
    pending_requests: int
    def __init__(self, run_id: _Optional[str] = ..., server_ns: _Optional[int] = ..., energy_j: _Optional[float] = ..., simulated: _Optional[bool] = ..., run_secret: _Optional[str] = ..., pending_requests: _Optional[int] = ...) -> None: ...

class GpuSelector(_message.Message):
    __slots__ = ("gpus",)
    GPUS_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, gpus: _Optional[_Iterable[str]] = ...) -> None: ...

class GetPowerCapsRequest(_message.Message):
    __slots__ = ("selector",)
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    selector: GpuSelector
    def __init__(self, selector: _Optional[_Union[GpuSelector, _Mapping]] = ...) -> None: ...

class SetPowerCapRequest(_message.Message):
    __slots__ = ("selector", "cap_w", "lease_s", "reason")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    CAP_W_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    selector: GpuSelector
    cap_w: float
    lease_s: float
    reason: str
    def __init__(self, selector: _Optional[_Union[GpuSelector, _Mapping]] = ..., cap_w: _Optional[float] = ..., lease_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class ResetPowerCapRequest(_message.Message):
    __slots__ = ("selector", "reason")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    selector: GpuSelector
    reason: str
    def __init__(self, selector: _Optional[_Union[GpuSelector, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class GpuPowerCap(_message.Message):
    __slots__ = ("uuid", "index", "rank", "node", "cap_w", "default_w", "min_w", "max_w", "enforced_w", "lease_end_ns", "simulated")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CAP_W_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_W_FIELD_NUMBER: _ClassVar[int]
    MIN_W_FIELD_NUMBER: _ClassVar[int]
    MAX_W_FIELD_NUMBER: _ClassVar[int]
    ENFORCED_W_FIELD_NUMBER: _ClassVar[int]
    LEASE_END_NS_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    rank: int
    node: str
    cap_w: float
    default_w: float
    min_w: float
    max_w: float
    enforced_w: float
    lease_end_ns: int
    simulated: bool
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., rank: _Optional[int] = ..., node: _Optional[str] = ..., cap_w: _Optional[float] = ..., default_w: _Optional[float] = ..., min_w: _Optional[float] = ..., max_w: _Optional[float] = ..., enforced_w: _Optional[float] = ..., lease_end_ns: _Optional[int] = ..., simulated: _Optional[bool] = ...) -> None: ...

class PowerCapsReply(_message.Message):
    __slots__ = ("gpus", "backend")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuPowerCap]
    backend: str
    def __init__(self, gpus: _Optional[_Iterable[_Union[GpuPowerCap, _Mapping]]] = ..., backend: _Optional[str] = ...) -> None: ...

class ExportRecordsRequest(_message.Message):
    __slots__ = ("cursor", "page_rows")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    PAGE_ROWS_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    page_rows: int
    def __init__(self, cursor: _Optional[str] = ..., page_rows: _Optional[int] = ...) -> None: ...

class Cell(_message.Message):
    __slots__ = ("null", "integer", "real", "text")
    NULL_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    REAL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    null: bool
    integer: int
    real: float
    text: str
    def __init__(self, null: _Optional[bool] = ..., integer: _Optional[int] = ..., real: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("cells",)
    CELLS_FIELD_NUMBER: _ClassVar[int]
    cells: _containers.RepeatedCompositeFieldContainer[Cell]
    def __init__(self, cells: _Optional[_Iterable[_Union[Cell, _Mapping]]] = ...) -> None: ...

class RecordPage(_message.Message):
    __slots__ = ("table", "columns", "rows", "cursor", "last")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    table: str
    columns: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    cursor: str
    last: bool
    def __init__(self, table: _Optional[str] = ..., columns: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., cursor: _Optional[str] = ..., last: _Optional[bool] = ...) -> None: ...

class GetClocksRequest(_message.Message):
    __slots__ = ("selector",)
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    selector: GpuSelector
    def __init__(self, selector: _Optional[_Union[GpuSelector, _Mapping]] = ...) -> None: ...

class SetLockedClocksRequest(_message.Message):
    __slots__ = ("selector", "sm_min_mhz", "sm_max_mhz", "mem_min_mhz", "mem_max_mhz", "lease_s", "reason")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SM_MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    SM_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEM_MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEM_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    selector: GpuSelector
    sm_min_mhz: int
    sm_max_mhz: int
    mem_min_mhz: int
    mem_max_mhz: int
    lease_s: float
    reason: str
    def __init__(self, selector: _Optional[_Union[GpuSelector, _Mapping]] = ..., sm_min_mhz: _Optional[int] = ..., sm_max_mhz: _Optional[int] = ..., mem_min_mhz: _Optional[int] = ..., mem_max_mhz: _Optional[int] = ..., lease_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class ResetClocksRequest(_message.Message):
    __slots__ = ("selector", "reason")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    selector: GpuSelector
    reason: str
    def __init__(self, selector: _Optional[_Union[GpuSelector, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class SupportedClocks(_message.Message):
    __slots__ = ("mem_mhz", "sm_mhz")
    MEM_MHZ_FIELD_NUMBER: _ClassVar[int]
    SM_MHZ_FIELD_NUMBER: _ClassVar[int]
    mem_mhz: int
    sm_mhz: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, mem_mhz: _Optional[int] = ..., sm_mhz: _Optional[_Iterable[int]] = ...) -> None: ...

class GpuClocks(_message.Message):
    __slots__ = ("uuid", "index", "rank", "node", "sm_mhz", "mem_mhz", "sm_max_mhz", "mem_max_mhz", "locked_sm_min_mhz", "locked_sm_max_mhz", "locked_mem_min_mhz", "locked_mem_max_mhz", "supported", "event_reasons", "lease_end_ns", "simulated")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SM_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEM_MHZ_FIELD_NUMBER: _ClassVar[int]
    SM_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEM_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    LOCKED_SM_MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    LOCKED_SM_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    LOCKED_MEM_MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    LOCKED_MEM_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    EVENT_REASONS_FIELD_NUMBER: _ClassVar[int]
    LEASE_END_NS_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    rank: int
    node: str
    sm_mhz: int
    mem_mhz: int
    sm_max_mhz: int
    mem_max_mhz: int
    locked_sm_min_mhz: int
    locked_sm_max_mhz: int
    locked_mem_min_mhz: int
    locked_mem_max_mhz: int
    supported: _containers.RepeatedCompositeFieldContainer[SupportedClocks]
    event_reasons: _containers.RepeatedScalarFieldContainer[str]
    lease_end_ns: int
    simulated: bool
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., rank: _Optional[int] = ..., node: _Optional[str] = ..., sm_mhz: _Optional[int] = ..., mem_mhz: _Optional[int] = ..., sm_max_mhz: _Optional[int] = ..., mem_max_mhz: _Optional[int] = ..., locked_sm_min_mhz: _Optional[int] = ..., locked_sm_max_mhz: _Optional[int] = ..., locked_mem_min_mhz: _Optional[int] = ..., locked_mem_max_mhz: _Optional[int] = ..., supported: _Optional[_Iterable[_Union[SupportedClocks, _Mapping]]] = ..., event_reasons: _Optional[_Iterable[str]] = ..., lease_end_ns: _Optional[int] = ..., simulated: _Optional[bool] = ...) -> None: ...

class ClocksReply(_message.Message):
    __slots__ = ("gpus", "backend")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuClocks]
    backend: str
    def __init__(self, gpus: _Optional[_Iterable[_Union[GpuClocks, _Mapping]]] = ..., backend: _Optional[str] = ...) -> None: ...
