from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    PENDING: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    STOPPED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
PENDING: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
STOPPED: JobState

class DedupSpec(_message.Message):
    __slots__ = ("inputs", "output", "workers", "threshold")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    output: str
    workers: int
    threshold: float
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., output: _Optional[str] = ..., workers: _Optional[int] = ..., threshold: _Optional[float] = ...) -> None: ...

class TokenizerSpec(_message.Message):
    __slots__ = ("corpus", "vocab_size", "output")
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    corpus: str
    vocab_size: int
    output: str
    def __init__(self, corpus: _Optional[str] = ..., vocab_size: _Optional[int] = ..., output: _Optional[str] = ...) -> None: ...

class TokenizeSpec(_message.Message):
    __slots__ = ("input", "tokenizer", "seq_len", "output", "workers")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    input: str
    tokenizer: str
    seq_len: int
    output: str
    workers: int
    def __init__(self, input: _Optional[str] = ..., tokenizer: _Optional[str] = ..., seq_len: _Optional[int] = ..., output: _Optional[str] = ..., workers: _Optional[int] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("preset", "data", "output", "min_workers", "max_workers", "steps", "resume_from", "checkpoint_every", "batch_tokens", "micro_batch", "tp", "precision", "device", "activation_checkpointing", "compile", "seed", "dropout", "optim", "guard", "keep", "milestone_every", "async_checkpoint", "mirror_every", "deterministic", "max_failures", "collective_timeout")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    COMPILE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    OPTIM_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    MILESTONE_EVERY_FIELD_NUMBER: _ClassVar[int]
    ASYNC_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    MIRROR_EVERY_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILURES_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    preset: str
    data: str
    output: str
    min_workers: int
    max_workers: int
    steps: int
    resume_from: int
    checkpoint_every: int
    batch_tokens: int
    micro_batch: int
    tp: int
    precision: str
    device: str
    activation_checkpointing: bool
    compile: bool
    seed: int
    dropout: float
    optim: OptimSpec
    guard: GuardSpec
    keep: int
    milestone_every: int
    async_checkpoint: bool
    mirror_every: float
    deterministic: bool
    max_failures: int
    collective_timeout: float
    def __init__(self, preset: _Optional[str] = ..., data: _Optional[str] = ..., output: _Optional[str] = ..., min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ..., steps: _Optional[int] = ..., resume_from: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., micro_batch: _Optional[int] = ..., tp: _Optional[int] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., activation_checkpointing: _Optional[bool] = ..., compile: _Optional[bool] = ..., seed: _Optional[int] = ..., dropout: _Optional[float] = ..., optim: _Optional[_Union[OptimSpec, _Mapping]] = ..., guard: _Optional[_Union[GuardSpec, _Mapping]] = ..., keep: _Optional[int] = ..., milestone_every: _Optional[int] = ..., async_checkpoint: _Optional[bool] = ..., mirror_every: _Optional[float] = ..., deterministic: _Optional[bool] = ..., max_failures: _Optional[int] = ..., collective_timeout: _Optional[float] = ...) -> None: ...

class OptimSpec(_message.Message):
    __slots__ = ("peak_lr", "betas", "eps", "weight_decay", "warmup_steps", "decay_steps", "min_lr_ratio", "grad_clip")
    PEAK_LR_FIELD_NUMBER: _ClassVar[int]
    BETAS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECAY_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    peak_lr: float
    betas: _containers.RepeatedScalarFieldContainer[float]
    eps: float
    weight_decay: float
    warmup_steps: int
    decay_steps: int
    min_lr_ratio: float
    grad_clip: float
    def __init__(self, peak_lr: _Optional[float] = ..., betas: _Optional[_Iterable[float]] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., decay_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ..., grad_clip: _Optional[float] = ...) -> None: ...

class GuardSpec(_message.Message):
    __slots__ = ("enabled", "spike_factor", "onset_factor", "window", "min_steps", "onset_patience", "check_nan", "grad_spike_factor", "loss_scale_floor", "min_checkpoint_loss_scale", "lr_factor", "clip_after_rollback", "skip_batches", "max_rollbacks")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SPIKE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    ONSET_FACTOR_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    ONSET_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    CHECK_NAN_FIELD_NUMBER: _ClassVar[int]
    GRAD_SPIKE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FLOOR_FIELD_NUMBER: _ClassVar[int]
    MIN_CHECKPOINT_LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    LR_FACTOR_FIELD_NUMBER: _ClassVar[int]
    CLIP_AFTER_ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    SKIP_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    spike_factor: float
    onset_factor: float
    window: int
    min_steps: int
    onset_patience: int
    check_nan: bool
    grad_spike_factor: float
    loss_scale_floor: float
    min_checkpoint_loss_scale: float
    lr_factor: float
    clip_after_rollback: float
    skip_batches: int
    max_rollbacks: int
    def __init__(self, enabled: _Optional[bool] = ..., spike_factor: _Optional[float] = ..., onset_factor: _Optional[float] = ..., window: _Optional[int] = ..., min_steps: _Optional[int] = ..., onset_patience: _Optional[int] = ..., check_nan: _Optional[bool] = ..., grad_spike_factor: _Optional[float] = ..., loss_scale_floor: _Optional[float] = ..., min_checkpoint_loss_scale: _Optional[float] = ..., lr_factor: _Optional[float] = ..., clip_after_rollback: _Optional[float] = ..., skip_batches: _Optional[int] = ..., max_rollbacks: _Optional[int] = ...) -> None: ...

class EvalSpec(_message.Message):
    __slots__ = ("checkpoint", "data", "split", "max_rows", "tasks", "num_fewshot", "has_num_fewshot", "limit", "include_path", "output", "workers", "tp")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    HAS_NUM_FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    data: str
    split: str
    max_rows: int
    tasks: _containers.RepeatedScalarFieldContainer[str]
    num_fewshot: int
    has_num_fewshot: bool
    limit: float
    include_path: str
    output: str
    workers: int
    tp: int
    def __init__(self, checkpoint: _Optional[str] = ..., data: _Optional[str] = ..., split: _Optional[str] = ..., max_rows: _Optional[int] = ..., tasks: _Optional[_Iterable[str]] = ..., num_fewshot: _Optional[int] = ..., has_num_fewshot: _Optional[bool] = ..., limit: _Optional[float] = ..., include_path: _Optional[str] = ..., output: _Optional[str] = ..., workers: _Optional[int] = ..., tp: _Optional[int] = ...) -> None: ...

class ExportSpec(_message.Message):
    __slots__ = ("run_dir", "output", "step")
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    run_dir: str
    output: str
    step: int
    def __init__(self, run_dir: _Optional[str] = ..., output: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class StageSpec(_message.Message):
    __slots__ = ("dedup", "tokenizer", "tokenize", "train", "eval", "export")
    DEDUP_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    dedup: DedupSpec
    tokenizer: TokenizerSpec
    tokenize: TokenizeSpec
    train: TrainSpec
    eval: EvalSpec
    export: ExportSpec
    def __init__(self, dedup: _Optional[_Union[DedupSpec, _Mapping]] = ..., tokenizer: _Optional[_Union[TokenizerSpec, _Mapping]] = ..., tokenize: _Optional[_Union[TokenizeSpec, _Mapping]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., eval: _Optional[_Union[EvalSpec, _Mapping]] = ..., export: _Optional[_Union[ExportSpec, _Mapping]] = ...) -> None: ...

class PipelineSpec(_message.Message):
    __slots__ = ("stages",)
    STAGES_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageSpec]
    def __init__(self, stages: _Optional[_Iterable[_Union[StageSpec, _Mapping]]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "dedup", "tokenize", "train", "eval", "export", "pipeline", "tokenizer", "serve")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEDUP_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    SERVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dedup: DedupSpec
    tokenize: TokenizeSpec
    train: TrainSpec
    eval: EvalSpec
    export: ExportSpec
    pipeline: PipelineSpec
    tokenizer: TokenizerSpec
    serve: ServeSpec
    def __init__(self, name: _Optional[str] = ..., dedup: _Optional[_Union[DedupSpec, _Mapping]] = ..., tokenize: _Optional[_Union[TokenizeSpec, _Mapping]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., eval: _Optional[_Union[EvalSpec, _Mapping]] = ..., export: _Optional[_Union[ExportSpec, _Mapping]] = ..., pipeline: _Optional[_Union[PipelineSpec, _Mapping]] = ..., tokenizer: _Optional[_Union[TokenizerSpec, _Mapping]] = ..., serve: _Optional[_Union[ServeSpec, _Mapping]] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("ray_submission_id", "stage", "entrypoint", "state", "message", "start_time", "end_time", "reason", "submitted")
    RAY_SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    ray_submission_id: str
    stage: str
    entrypoint: str
    state: JobState
    message: str
    start_time: float
    end_time: float
    reason: str
    submitted: bool
    def __init__(self, ray_submission_id: _Optional[str] = ..., stage: _Optional[str] = ..., entrypoint: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ..., start_time: _Optional[float] = ..., end_time: _Optional[float] = ..., reason: _Optional[str] = ..., submitted: _Optional[bool] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "kind", "name", "state", "message", "spec", "attempts", "created", "updated", "run_dir", "stage_index", "stage_count", "plan")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    name: str
    state: JobState
    message: str
    spec: JobSpec
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    created: float
    updated: float
    run_dir: str
    stage_index: int
    stage_count: int
    plan: _containers.RepeatedCompositeFieldContainer[PlannedStage]
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ..., run_dir: _Optional[str] = ..., stage_index: _Optional[int] = ..., stage_count: _Optional[int] = ..., plan: _Optional[_Iterable[_Union[PlannedStage, _Mapping]]] = ...) -> None: ...

class PlannedStage(_message.Message):
    __slots__ = ("kind", "argv", "run_dir")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    kind: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    run_dir: str
    def __init__(self, kind: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., run_dir: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("active_only", "kind", "page_size", "page_token")
    ACTIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    active_only: bool
    kind: str
    page_size: int
    page_token: str
    def __init__(self, active_only: _Optional[bool] = ..., kind: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ScaleJobRequest(_message.Message):
    __slots__ = ("job_id", "min_workers", "max_workers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    min_workers: int
    max_workers: int
    def __init__(self, job_id: _Optional[str] = ..., min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ...) -> None: ...

class RollbackJobRequest(_message.Message):
    __slots__ = ("job_id", "checkpoint_step", "optim")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    OPTIM_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    checkpoint_step: int
    optim: OptimSpec
    def __init__(self, job_id: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., optim: _Optional[_Union[OptimSpec, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "include_logs", "include_metrics", "from_start")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LOGS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_METRICS_FIELD_NUMBER: _ClassVar[int]
    FROM_START_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    include_logs: bool
    include_metrics: bool
    from_start: bool
    def __init__(self, job_id: _Optional[str] = ..., include_logs: _Optional[bool] = ..., include_metrics: _Optional[bool] = ..., from_start: _Optional[bool] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("time", "job_id", "status", "log", "metrics_line", "logbook_line")
    TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    METRICS_LINE_FIELD_NUMBER: _ClassVar[int]
    LOGBOOK_LINE_FIELD_NUMBER: _ClassVar[int]
    time: float
    job_id: str
    status: Job
    log: str
    metrics_line: str
    logbook_line: str
    def __init__(self, time: _Optional[float] = ..., job_id: _Optional[str] = ..., status: _Optional[_Union[Job, _Mapping]] = ..., log: _Optional[str] = ..., metrics_line: _Optional[str] = ..., logbook_line: _Optional[str] = ...) -> None: ...

class ServeSpec(_message.Message):
    __slots__ = ("name", "checkpoint", "replicas", "max_replicas", "http_port", "grpc_port", "max_num_seqs", "tensor_parallel_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HTTP_PORT_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint: str
    replicas: int
    max_replicas: int
    http_port: int
    grpc_port: int
    max_num_seqs: int
    tensor_parallel_size: int
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[str] = ..., replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., http_port: _Optional[int] = ..., grpc_port: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class ServeApp(_message.Message):
    __slots__ = ("name", "spec", "job_id", "state", "message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: ServeSpec
    job_id: str
    state: JobState
    message: str
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[ServeSpec, _Mapping]] = ..., job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ...) -> None: ...

class DeployServeRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ServeSpec
    def __init__(self, spec: _Optional[_Union[ServeSpec, _Mapping]] = ...) -> None: ...

class UpdateServeRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ServeSpec
    def __init__(self, spec: _Optional[_Union[ServeSpec, _Mapping]] = ...) -> None: ...

class RemoveServeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListServeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServeResponse(_message.Message):
    __slots__ = ("apps",)
    APPS_FIELD_NUMBER: _ClassVar[int]
    apps: _containers.RepeatedCompositeFieldContainer[ServeApp]
    def __init__(self, apps: _Optional[_Iterable[_Union[ServeApp, _Mapping]]] = ...) -> None: ...

class ReadLogbookRequest(_message.Message):
    __slots__ = ("job_id", "run_dir", "markdown")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    MARKDOWN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    run_dir: str
    markdown: bool
    def __init__(self, job_id: _Optional[str] = ..., run_dir: _Optional[str] = ..., markdown: _Optional[bool] = ...) -> None: ...

class ReadLogbookResponse(_message.Message):
    __slots__ = ("events", "markdown", "run_dir")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    MARKDOWN_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedScalarFieldContainer[str]
    markdown: str
    run_dir: str
    def __init__(self, events: _Optional[_Iterable[str]] = ..., markdown: _Optional[str] = ..., run_dir: _Optional[str] = ...) -> None: ...

class ClusterHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ComponentHealth(_message.Message):
    __slots__ = ("name", "ok", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    ok: bool
    detail: str
    def __init__(self, name: _Optional[str] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class ClusterHealthResponse(_message.Message):
    __slots__ = ("ok", "components", "alive_nodes", "total_resources", "available_resources", "dashboard_url", "active_jobs", "metrics_endpoints")
    class TotalResourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class AvailableResourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OK_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_NODES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    DASHBOARD_URL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_JOBS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    components: _containers.RepeatedCompositeFieldContainer[ComponentHealth]
    alive_nodes: int
    total_resources: _containers.ScalarMap[str, float]
    available_resources: _containers.ScalarMap[str, float]
    dashboard_url: str
    active_jobs: int
    metrics_endpoints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., components: _Optional[_Iterable[_Union[ComponentHealth, _Mapping]]] = ..., alive_nodes: _Optional[int] = ..., total_resources: _Optional[_Mapping[str, float]] = ..., available_resources: _Optional[_Mapping[str, float]] = ..., dashboard_url: _Optional[str] = ..., active_jobs: _Optional[int] = ..., metrics_endpoints: _Optional[_Iterable[str]] = ...) -> None: ...
