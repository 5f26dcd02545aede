"""One configuration tree for the whole system; frozen dataclasses inside, defaults next to why.

The HTTP/CLI edges validate user input (pydantic) and build these; inside, nothing re-reads the
environment or invents its own defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class EngineConfig:
    # 16 tokens per KV block: small enough that an editor's keystroke (which changes only the end
    # of the prompt) loses at most one block of prefix-cache reuse, large enough that block tables
    # and the attention gather stay cheap.
    block_size: int = 16
    # KV capacity in blocks (2048 × 16 = 32k tokens). For the default model that is ~50 MB.
    num_kv_blocks: int = 2048
    # Concurrent sequences in the running batch.
    max_num_seqs: int = 64
    # Token budget per step. It bounds one step's latency, so running decodes keep flowing while
    # long prompts are prefilled in chunks.
    max_num_batched_tokens: int = 512
    # At most this many prefill tokens of one sequence per step (chunked prefill).
    long_prefill_chunk: int = 256
    # None = the model's max_position_embeddings.
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # Admission control: beyond these the engine refuses new work (HTTP maps it to 429/503 with
    # Retry-After) instead of growing a queue whose tail latency nobody wants.
    max_waiting_requests: int = 256
    max_waiting_tokens: int = 65536
    # Shed load by queue delay (CoDel's signal: how long the head of the queue has waited, not how
    # long the queue is): while the oldest waiting request has waited longer than this, new ones
    # are refused. A count limit alone lets a queue of short-lived requests grow to seconds of wait
    # at 5x overload; an inline completion that waited 1 s is stale before it starts. None = off.
    max_queue_delay_s: float | None = 1.0
    # Shed load by predicted latency: a new request is refused while (the oldest waiting request's
    # wait) + (the recent step time) × (the steps it needs: its prefill chunks + max_tokens) exceeds
    # this. The queue delay bounds only the wait before a request's first step; with up to
    # max_num_seqs sequences decoding together, each step slows as the batch grows, so admitted
    # requests lose their latency even with an empty queue. The step time rises with the admitted
    # load, which closes admission: a feedback loop that keeps the batch where requests still
    # finish within the budget. Applies only while the engine has work (an idle engine admits).
    # None = off.
    max_predicted_latency_s: float | None = None
    # What a rejected client is told to wait before retrying.
    retry_after_s: float = 1.0
    # Speculative decoding of full-precision rows (engine/speculative.py): draft up to this many
    # tokens with the model's `speculative_precision` copy (in-process, no shard hop), verify them
    # in one full-precision pass. 0 = off; engines whose model holds no such copy never draft.
    # 8: full-precision FIM through 2 shards p50 228 ms without, 192 ms with 4, 163 ms with 8;
    # complex best-of-3 315 / 273 / 205 ms (docs/benchmarks.md, 2026-12-03, bench/expert_parallel.py).
    speculative_tokens: int = 8
    speculative_precision: str = "int8"
    # Rows with no cheaper copy to draft with (quantized requests) draft up to this many tokens by
    # prompt lookup (the continuation of the last earlier occurrence of their last 1-3 tokens),
    # verified the same way. 0 = off: on the 2-core CPU a verification row leaves the fused decode
    # kernels, and 4 took the editor load's p80 from 55.7 to 154.2 ms (docs/benchmarks.md, 2026-12-03).
    speculative_lookup_tokens: int = 0
    # Typing-through drafts (SamplingParams.draft_token_ids: the rest of a suggestion the user is
    # typing, api/typing_through.py): up to this many verified in one step, any lane. 0 = ignored.
    # Unlike lookup drafts they come only where the user typed a suggestion, and are kept there:
    # the INT4 lane's keystrokes p50 82 → 79 ms, those that continue the suggestion 79 → 38 ms
    # (docs/benchmarks.md, 2026-12-04, bench/typing_through.py).
    typing_through_tokens: int = 16
    # "continuous" admits work every step; "static" only when the running batch has drained
    # (the classic batching server, kept as the peer our benchmarks measure against).
    scheduling: str = "continuous"

    def __post_init__(self):
        for name in ("block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
                     "long_prefill_chunk", "max_waiting_requests", "max_waiting_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("speculative_tokens", "speculative_lookup_tokens", "typing_through_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"EngineConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_queue_delay_s", "max_predicted_latency_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"EngineConfig.{name} must be > 0 or None, got {value}")
        if self.scheduling not in ("continuous", "static"):
            raise ValueError(f"EngineConfig.scheduling must be 'continuous' or 'static', got {self.scheduling!r}")


@dataclass(frozen=True)
class ProcessSettings:
    """Per-process knobs of a serving process (Router, ExpertShard, Ingress, embedded); the values
    and why they are what they are: AppConfig's fields of the same names."""
    torch_threads: int                   # torch intra-op threads
    gil_switch_interval_s: float         # sys.setswitchinterval

    def apply(self) -> None:
        import sys

        import torch
        torch.set_num_threads(self.torch_threads)
        sys.setswitchinterval(self.gil_switch_interval_s)


API_KEYS_ENV = "MOE_SERVE_API_KEYS"


def api_keys_from_env() -> tuple[str, ...]:
    """Comma-separated keys from MOE_SERVE_API_KEYS. Read where requests are served (the Ingress
    replica, the embedded server), so keys from a Kubernetes Secret never enter a stored config."""
    import os
    return tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())


def default_model_dir() -> str:
    """The bundled default model, shipped inside the package."""
    from pathlib import Path
    return str(Path(__file__).resolve().parent / "default_model")


class Autoscaling(BaseModel):
    """One deployment's Serve autoscaling (ray.serve.config.AutoscalingConfig's fields of the same
    names): Serve adds replicas while requests in flight per replica exceed the target for
    `upscale_delay_s` and removes them after `downscale_delay_s` below it."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(1, ge=1, le=1000)
    initial_replicas: int | None = Field(None, ge=0, le=1000)
    # Requests in flight per replica. Inline completions are short (tens of ms) and an engine
    # batches up to max_num_seqs of them, so a Router replica keeps up with tens at once.
    target_ongoing_requests: float = Field(16.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    # How far back Serve averages the replicas' load when deciding.
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def serve_options(self) -> dict:
        """`Deployment.options(**...)`: a fixed replica count where min == max, else autoscaling."""
        if self.min_replicas == self.max_replicas:
            return {"num_replicas": self.max_replicas}
        return {"autoscaling_config": self.model_dump(exclude_none=True)}


AutoscaledKind = Literal["ingress", "router", "expert_shard"]     # every ExpertShard<i> is an "expert_shard"


class AppConfig(BaseModel):
    """Everything `build_app` / `moe-serve` / a Serve config YAML can set (validated at the edge)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default_factory=default_model_dir, description="checkpoint directory (HF format)")
    served_model_name: str | None = Field(None, description="name clients use; default: the directory name")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="full precision: weights and activations; 'auto' = the checkpoint's own dtype "
        "(config.json torch_dtype) where this device computes in it faster than in float32, else float32")
    fast_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="activations of the quantized (fast) lane; 'auto' = bfloat16 where torch's packed "
        "int8/int4 kernels with bf16 activations beat a float32 matmul (measured at start-up), else float32")
    expert_shards: int = Field(2, ge=0, le=64, description="ExpertShard deployments; 0 keeps all experts local")
    placement: dict[str, list[int | tuple[int, int]]] | None = Field(
        None, description="explicit layout {'0': [experts], ..., 'local': [...]}; default round-robin")
    shard_num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs per shard replica; 'auto' = 1 when the cluster has GPUs, else 0")
    router_num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs for the Router replica (dense layers, KV cache, gates and the quantized "
        "experts run there); 'auto' = 1 when the cluster has GPUs, else 0")
    shard_resources: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per shard replica (e.g. {'expert_slot': 1} "
        "with one slot per worker node spreads shards one per node)")
    dispatch_timeout_s: float = Field(10.0, gt=0, description="a shard call slower than this fails the step (503)")
    expert_transport: Literal["socket", "serve"] = Field(
        "socket", description="how a MoE layer's rows reach the shards: 'socket' = the data plane (one TCP "
        "connection per shard, addresses from Serve); 'serve' = a Serve handle call per shard per layer. "
        "Per layer with 4 shards: see docs/benchmarks.md, 'Data plane'")
    engine_host: Literal["auto", "process", "replica"] = Field(
        "auto", description="where the Router's engine runs: 'process' = a child process of the Router replica, "
        "reached by the Ingress over one TCP connection (no Ray threads beside the engine, no Serve hop per "
        "request); 'replica' = inside the replica, requests over Serve handles (needed by "
        "expert_transport 'serve'); 'auto' = replica, until the process hosting's Router restart (14 s "
        "against 6-10 s) and a metrics export that Prometheus stopped scraping after the chaos soak are "
        "fixed. Measured: docs/benchmarks.md, 'The engine in its own process'")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields")
    quantized_precisions: tuple[Literal["int8", "int4"], ...] = Field(
        ("int8", "int4"), description="quantized copies of all experts the router holds (the fast path); "
        "empty = every request at full precision")
    int4_group_size: Literal[32, 64, 128] = Field(64, description="INT4 quantization group along the input dim")
    quant_materialize: bool | Literal["auto"] = Field(
        "auto", description="keep dequantized float copies of quantized weights (quantized numerics): every "
        "call of a dequant-path weight uses it, and kernel-path weights use it for calls above their row "
        "limit (prefill chunks); 'auto' = on CPU")
    fast_lane_kv_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of the KV blocks for the fast (quantized) lane's engine")
    full_lane_max_defer_s: float = Field(
        1.0, ge=0, description="the full-precision lane steps only while the fast lane is idle, or after "
        "waiting this long (its starvation bound); 0 = the lanes run freely side by side. 1.0 kept simple "
        "requests' p80 within 20% under complex load on 2 CPU cores (docs/benchmarks.md)")
    torch_threads: int = Field(
        1, ge=1, le=256, description="torch intra-op threads per serving process (Router, shards, embedded). "
        "1: with torch's default (one per core) the engine threads, the event loop and the shard processes "
        "fight over OpenMP spin-waits; 8 editors on 2 cores: inline p80 1103 ms with 2 threads, 498 ms with 1 "
        "(docs/benchmarks.md, 2026-12-01)")
    gil_switch_interval_s: float = Field(
        0.0005, gt=0, le=0.1, description="sys.setswitchinterval in serving processes: how long the engine "
        "thread may hold the GIL while the event loop waits for it (Python's default 5 ms delayed every "
        "hand-off; 0.5 ms took inline p80 from 498 to 445 ms under 8 editors, docs/benchmarks.md)")
    num_routers: int = Field(
        1, ge=1, le=64, description="Router replicas (a fixed count; autoscaling.router instead scales them). "
        "Each holds its own engines and prefix cache; several need engine_host 'replica'")
    router_routing: Literal["prefix", "power_of_two"] = Field(
        "prefix", description="how the Ingress picks a Router replica for a request: 'prefix' = the replica that "
        "last got the longest prefix of its prompt (its cache holds it), unless that one is overloaded "
        "(deployments/prefix_routing.py); 'power_of_two' = Serve's default (the less busy of two at random)")
    autoscaling: dict[AutoscaledKind, Autoscaling] = Field(
        default_factory=dict, description="Serve autoscaling per deployment kind (every ExpertShard deployment "
        "gets the expert_shard one); a kind left out runs one replica. More than one Router replica needs "
        "engine_host 'replica' (the Ingress reaches the engine process of one replica only) and more than one "
        "replica of a shard needs expert_transport 'serve' (the socket plane connects to one replica a shard)")
    typing_through: bool = Field(
        True, description="remember each hole's last suggestions at the ingress and, when the user types one, "
        "send its rest to the engine as a draft verified in one step (api/typing_through.py): same output, "
        "fewer steps")
    api_keys: tuple[str, ...] = Field((), description="accepted Bearer keys; empty = no auth")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger request bodies get 413")
    request_timeout_s: float = Field(60.0, gt=0, description="a request running longer is aborted")
    shed_window_s: float = Field(0.1, ge=0, description="after the engine refuses a request, the ingress refuses "
                                 "new ones itself (429) for this long, before parsing them; 0 = off "
                                 "(api/shedding.py)")
    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port clients reach")
    front: bool = Field(
        True, description="`moe-serve` (Ray) serves the port from a relay in its own process that sends each "
        "request to an Ingress replica's port (port+1 .. port+N, N = the Ingress's max replicas) and answers "
        "503 with Retry-After while none is up (serve_app/front); false = the Ingress replica listens on the "
        "port itself (one replica; ~0.5 ms less per request: GET /v1/models p50 2.6 against 3.3 ms through the "
        "front, docs/benchmarks.md 2026-12-04 \"A front that outlives the Ingress\")")

    def ingress_ports(self) -> tuple[int, ...]:
        """The direct-ingress port range of the Ingress replicas: the public port alone without a
        front, else one port per replica the Ingress may have, right above the public one."""
        if not self.front:
            return (self.port,)
        n = self.autoscaling["ingress"].max_replicas if "ingress" in self.autoscaling else 1
        return tuple(range(self.port + 1, self.port + 1 + n))

    @model_validator(mode="after")
    def _engine_host_fits_transport(self) -> "AppConfig":
        if self.engine_host == "process" and self.expert_transport == "serve" and self._has_shards():
            raise ValueError("engine_host 'process' needs expert_transport 'socket': the engine process has no "
                             "Ray worker to call Serve handles from (use engine_host 'replica' or 'auto')")
        return self

    @model_validator(mode="after")
    def _replicas_fit_the_connections(self) -> "AppConfig":
        router, shard = self.autoscaling.get("router"), self.autoscaling.get("expert_shard")
        if router is not None and self.num_routers != 1:
            raise ValueError("num_routers and autoscaling.router both set the Router's replicas: give one of them")
        most_routers = router.max_replicas if router is not None else self.num_routers
        if most_routers > 1 and self.resolved_engine_host() == "process":
            raise ValueError("more than one Router replica (num_routers, autoscaling.router.max_replicas) needs "
                             "engine_host 'replica': with 'process' the Ingress connects to the engine process of "
                             "one Router replica")
        if shard is not None and shard.max_replicas > 1 and self.expert_transport == "socket" and self._has_shards():
            raise ValueError("autoscaling.expert_shard.max_replicas > 1 needs expert_transport 'serve': the socket "
                             "data plane connects to one replica of each shard, so more would stay idle")
        return self

    def replicas(self, kind: AutoscaledKind) -> dict:
        """Serve options for the replicas of one deployment kind."""
        if kind in self.autoscaling:
            return self.autoscaling[kind].serve_options()
        return {"num_replicas": self.num_routers} if kind == "router" and self.num_routers > 1 else {}

    def single_replicas(self) -> bool:
        """One replica of the Router and of each shard at most (what re-placing experts needs)."""
        return all(self.autoscaling[k].max_replicas == 1 for k in ("router", "expert_shard") if k in self.autoscaling) \
            and self.num_routers == 1

    def resolved_engine_host(self) -> str:
        if self.engine_host != "auto":
            return self.engine_host
        return "replica"

    def _has_shards(self) -> bool:
        if self.placement is not None:
            return any(key != "local" and experts for key, experts in self.placement.items())
        return self.expert_shards > 0

    def process_settings(self) -> "ProcessSettings":
        return ProcessSettings(self.torch_threads, self.gil_switch_interval_s)

    def engine_config(self) -> EngineConfig:
        try:
            return EngineConfig(**self.engine)
        except TypeError as exc:
            raise ValueError(f"engine: {exc}") from exc

    @property
    def model_name(self) -> str:
        from pathlib import Path
        return self.served_model_name or Path(self.model).name
