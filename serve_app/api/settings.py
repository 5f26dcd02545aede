"""What the HTTP layer is configured with; built once by whoever creates the app (tests, deployments)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from serve_app.engine.sampling_params import SamplingParams, SamplingParamsError
from serve_app.tokenizer import CodeTokenizer

# 1 MiB of JSON is ~250k tokens of code, far beyond any context we serve; larger bodies are refused
# before they are read into memory or parsed.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# A completion that has not finished in 5 minutes is stuck or abusive; it is aborted so its KV
# blocks go back to the pool. Inline completions finish in well under a second.
DEFAULT_REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults a checkpoint ships in ``generation_config.json``, applied to the fields a
    request leaves out (vLLM applies a checkpoint's generation config the same way; an explicit
    value in the request always wins). Only the penalties are read: temperature and the number of
    candidates belong to the tier policy. The bundled default model sets a frequency penalty
    because, greedy, it loops on one line until ``max_tokens`` (its MODEL_CARD has the numbers)."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # The default penalties leave whitespace/punctuation tokens alone (SamplingParams'
    # penalty_skips_structural); penalties a client sends keep OpenAI's meaning.
    penalty_skips_structural: bool = False

    def __post_init__(self) -> None:
        try:
            SamplingParams(frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                           penalty_skips_structural=self.penalty_skips_structural)
        except SamplingParamsError as exc:
            raise ValueError(f"generation_config.json: {exc}") from exc

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "GenerationDefaults":
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


@dataclass(frozen=True)
class ApiSettings:
    served_model_name: str              # the only `model` value requests may name
    tokenizer: CodeTokenizer            # prompts are tokenized here, at the ingress (DESIGN §2.1)
    max_model_len: int                  # prompt + max_tokens must fit; checked before the engine sees it
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_keys: tuple[str, ...] = ()      # empty: no authentication (local use)
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    # Precisions the backend serves. "auto" requests whose tier wants one it lacks run at full
    # precision (still labelled with their tier); an explicit request for it is a 400.
    precisions: tuple[str, ...] = ("full",)
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    shed_window_s: float = 0.0          # edge shedding after an engine refusal (api/shedding.py); 0 = off
    # Typing-through drafts (api/typing_through.py): remember suggestions per hole, draft their rest
    # when the user types them. The memory is this app's, made here.
    typing_through: bool = True
    suggestions: "SuggestionMemory | None" = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.typing_through and self.suggestions is None:
            from serve_app.api.typing_through import SuggestionMemory
            object.__setattr__(self, "suggestions", SuggestionMemory(self.tokenizer))
        if not self.served_model_name:
            raise ValueError("ApiSettings.served_model_name must be non-empty")
        for name in ("max_model_len", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ApiSettings.{name} must be >= 1, got {getattr(self, name)}")
        if not self.shed_window_s >= 0:
            raise ValueError(f"ApiSettings.shed_window_s must be >= 0, got {self.shed_window_s}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"ApiSettings.request_timeout_s must be > 0, got {self.request_timeout_s}")
        if isinstance(self.api_keys, str) or any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ValueError("ApiSettings.api_keys must be a tuple of non-empty strings")
