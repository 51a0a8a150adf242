"""From an OpenAI request to engine jobs, the way the model classes' task methods build their rows:
CPM-1 and CPM-2 ``generate``, CPM-2 ``fill_blank`` (a prompt with ``<span>``), EVA ``dialogue``.

Fields a request leaves out take the task method's defaults (``temperature=0.9`` for generate,
``top_k=10, temperature=0.85`` for EVA, ``max_tokens=128``), so a request equals the method called
with the same arguments. Choice ``i`` of ``n`` uses ``seed + i``: choice 0 is what the request gives
with ``n=1``. Every check raises ``APIError(400, ...)`` naming the field, before anything is queued.

A fill-blank completion's text is the prompt with each ``<span>`` replaced by its blank's text (blanks
that ``max_tokens`` left unreached keep their ``<span>``); the blanks themselves are in the choice's
``blanks`` field as ``fill_blank`` returns them.

>>> tasks = completion_tasks(cpm2, CompletionRequest(model="cpm2", prompt="今天<span>很好"))  # doctest: +SKIP
"""
import inspect
from typing import Callable, List, Optional, Sequence

from ..generation import SamplingParams
from ..models.cpm2 import _MARKER_LIKE, SPAN
from ..models.pretrained import InputTooLongError, Prepared
from .engine import Job
from .protocol import APIError, ChatRequest, CompletionRequest

__all__ = ["Task", "completion_tasks", "chat_tasks", "supported_endpoint", "MAX_CHOICES"]

MAX_CHOICES = 64  # prompts x n of one request


class Task:
    """One choice of a response: its job, how its outputs become text, and what it counts."""

    def __init__(self, index: int, prompt_tokens: int, render: Callable[[object], str],
                 tail: Callable[[], str] = lambda: "", blanks: Optional[Callable[[], list]] = None):
        self.index, self.prompt_tokens, self.render, self.tail, self.blanks = index, prompt_tokens, render, tail, blanks
        self.job: Optional[Job] = None

    def finish_reason(self) -> str:
        job = self.job
        return "stop" if job.row.stopped or job.produced < job.params.max_tokens else "length"


def supported_endpoint(model) -> str:
    """The one endpoint that serves ``model``: completions for CPM-1/CPM-2, chat completions for EVA."""
    return "chat/completions" if model.model_key == "eva" else "completions"


def _defaults(method) -> dict:
    return {name: p.default for name, p in inspect.signature(method).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _params(model, req, method, max_tokens: Optional[int]) -> SamplingParams:
    d = _defaults(method)
    pick = (lambda value, name: d[name] if value is None else value)
    params = SamplingParams(max_tokens=pick(max_tokens, "max_tokens"), temperature=pick(req.temperature, "temperature"),
                            top_n=pick(req.top_k, "top_n"), top_p=pick(req.top_p, "top_p"),
                            frequency_penalty=pick(req.frequency_penalty, "frequency_penalty"),
                            presence_penalty=pick(req.presence_penalty, "presence_penalty"), seed=req.seed)
    try:
        params.check(model.tokenizer.vocab_size)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        if field == "top_n":
            field, message = "top_k", message.replace("top_n", "top_k", 1)
        raise APIError(400, message, param=field) from exc
    return params


def _check_common(req, limit_tokens: Optional[int]) -> None:
    if isinstance(req.n, bool) or req.n < 1:
        raise APIError(400, f"n must be an integer >= 1, got {req.n}", param="n")
    for name in ("logprobs", "logit_bias", "echo", "suffix", "top_logprobs", "tools", "response_format"):
        value = getattr(req, name, None)
        if value not in (None, False, {}, []):
            raise APIError(400, f"{name} is not supported by bminf's server; leave it out", param=name)
    if getattr(req, "best_of", None) not in (None, 1):
        raise APIError(400, "best_of is not supported by bminf's server; leave it out or set it to 1", param="best_of")
    if limit_tokens is not None and req.max_tokens is not None and req.max_tokens > limit_tokens:
        raise APIError(400, f"max_tokens must be in [0, {limit_tokens}], got {req.max_tokens}", param="max_tokens")


def _stops(stop) -> List[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for i, s in enumerate(stops):
        if not s:
            raise APIError(400, f"stop[{i}] must be a non-empty string", param="stop")
    return stops


def _seeds(req) -> List[Optional[int]]:
    return [None if req.seed is None else req.seed + i for i in range(req.n)]


def _with_seed(params: SamplingParams, seed: Optional[int]) -> SamplingParams:
    return SamplingParams(**{**params.__dict__, "seed": seed})


def completion_tasks(model, req: CompletionRequest) -> List[Task]:
    """The tasks (one per prompt and choice) of a completion request to CPM-1 or CPM-2."""
    if model.model_key == "eva":
        raise APIError(404, f"the loaded model {model.version!r} (EVA) serves POST /v1/chat/completions, "
                            "not /v1/completions", param="model", code="unsupported_endpoint")
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list", param="prompt")
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"prompts x n is {len(prompts) * req.n}; at most {MAX_CHOICES} per request", param="n")
    t5 = model.model_key == "cpm2"
    _check_common(req, model.max_decoder_tokens if t5 else None)
    stops = _stops(req.stop)
    tok = model.tokenizer
    tasks: List[Task] = []
    for p, text in enumerate(prompts):
        name = "prompt" if isinstance(req.prompt, str) else f"prompt[{p}]"
        if not isinstance(text, str) or not text.strip():
            raise APIError(400, f"{name} must be a non-empty string", param="prompt")
        fill = t5 and _MARKER_LIKE.search(text) is not None
        method = model.fill_blank if fill else model.generate
        params = _params(model, req, method, req.max_tokens)
        if fill and stops:
            raise APIError(400, "stop is not supported for a prompt with <span> blanks (its answers end at "
                                "each blank's sentinel)", param="stop")
        if fill:
            prepared = _prepare(lambda: model.prepare_fill_blank(text, params.max_tokens, name=name), "prompt")
        elif t5:
            prepared = _prepare(lambda: model.prepare_generate(text, params.max_tokens, stops, name=name), "prompt")
        else:  # the class cuts a long prompt from the left with a warning; a server refuses, as OpenAI does
            prepared = _prepare(lambda: model.prepare_generate(text, params.max_tokens, stops, truncate=False,
                                                               name=name), "prompt")
        for i, seed in enumerate(_seeds(req)):
            row = prepared.new_row()
            task = _fill_task(text, prepared, row) if fill else Task(0, len(prepared.source), render=str)
            task.index = p * req.n + i
            task.job = _job(prepared, row, _with_seed(params, seed), tok.vocab_size)
            tasks.append(task)
    return tasks


def chat_tasks(model, req: ChatRequest) -> List[Task]:
    """The tasks (one per choice) of a chat request to EVA: the messages' contents, in order, are the
    dialogue context."""
    if model.model_key != "eva":
        raise APIError(404, f"the loaded model {model.version!r} serves POST /v1/completions, not "
                            "/v1/chat/completions (chat is EVA's)", param="model", code="unsupported_endpoint")
    if req.n > MAX_CHOICES:
        raise APIError(400, f"n must be at most {MAX_CHOICES}, got {req.n}", param="n")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    _check_common(req, None)
    if max_tokens is not None and max_tokens > model.max_decoder_tokens:
        raise APIError(400, f"max_tokens must be in [0, {model.max_decoder_tokens}], got {max_tokens}",
                       param="max_tokens")
    stops = _stops(req.stop)
    if not req.messages:
        raise APIError(400, "messages is empty: give at least one message", param="messages")
    context = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):  # content parts: only text parts mean something here
            if any(part.get("type") != "text" for part in content):
                raise APIError(400, f"messages[{i}].content may hold only text parts", param="messages")
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str) or not content.strip():
            raise APIError(400, f"messages[{i}].content must be non-empty text", param="messages")
        context.append(content)
    params = _params(model, req, model.dialogue, max_tokens)
    truncation = _defaults(model.dialogue)["truncation_length"]
    prepared = _prepare(lambda: model.prepare_dialogue(context, params.max_tokens, truncation, stops,
                                                       name="messages"), "messages")
    tasks = []
    for i, seed in enumerate(_seeds(req)):
        row = prepared.new_row()
        task = Task(i, len(prepared.source), render=str)
        task.job = _job(prepared, row, _with_seed(params, seed), model.tokenizer.vocab_size)
        tasks.append(task)
    return tasks


def _unset(kind, value):  # replaced by the app before the job is submitted
    raise RuntimeError("job submitted without a sink")


def _prepare(build: Callable[[], Prepared], param: str) -> Prepared:
    """The model's own formatting of one input; its errors become 400s naming the field."""
    try:
        return build()
    except InputTooLongError as exc:
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from exc
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), param=param) from exc


def _job(prepared: Prepared, row, params: SamplingParams, vocab_size: int) -> Job:
    return Job(prepared.source, prepared.prefix, row, params, vocab_size, sink=_unset,
               no_penalty=prepared.no_penalty, filtered=prepared.filtered)


def _fill_task(text: str, prepared: Prepared, row) -> Task:
    filled = FilledText(text, prepared.positions)
    return Task(0, len(prepared.source), render=filled.piece, tail=lambda: filled.tail(len(row.texts)),
                blanks=lambda: [{"position": p, "text": t} for p, t in zip(prepared.positions, row.texts)])


class FilledText:
    """The prompt with its blanks filled, as pieces: the text before blank k comes out when blank k
    opens, the rest when the row ends. The pieces join to the filled text.

    >>> f = FilledText("a<span>b<span>c", [1, 8])
    >>> f.piece((0, "X")) + f.piece((1, "Y")) + f.tail(2)
    'aXbYc'
    """

    def __init__(self, prompt: str, positions: Sequence[int]):
        self.prompt, self.positions = prompt, list(positions)
        self.opened = 0   # blanks whose preceding text was given out
        self.start = 0    # where the prompt's next literal text starts

    def _open_through(self, k: int) -> str:
        out = ""
        while self.opened <= k:
            out += self.prompt[self.start:self.positions[self.opened]]
            self.start = self.positions[self.opened] + len(SPAN)
            self.opened += 1
        return out

    def piece(self, out) -> str:
        blank, text = out
        return self._open_through(blank) + text

    def tail(self, reached: int) -> str:
        """The rest, once the row is done with ``reached`` blanks opened."""
        return self._open_through(reached - 1) + self.prompt[self.start:]
