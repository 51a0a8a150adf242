"""The HTTP side: FastAPI routes speaking the OpenAI API over the batching engine, and ``serve``.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (CPM-1, CPM-2),
``POST /v1/chat/completions`` (EVA); ``stream: true`` answers with server-sent events in OpenAI's
chunk format, ending with ``data: [DONE]``. Every error is OpenAI's error object. Requests are
tokenized off the event loop, decoded by the engine's worker thread, and a client that goes away
cancels its jobs, which leave the batch at the next step.

>>> serve(bminf.models.CPM2(version="cpm2-demo"), port=8000)        # doctest: +SKIP
"""
import asyncio
import contextlib
import json
import logging
from typing import AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, ShuttingDown
from .protocol import APIError, ChatRequest, CompletionRequest, error_body, new_id, now
from .tasks import Task, chat_tasks, completion_tasks, supported_endpoint

__all__ = ["create_app", "serve", "MAX_BODY_BYTES"]

_log = logging.getLogger("bminf.serving")
MAX_BODY_BYTES = 1 << 20


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class _ClientGone(Exception):
    """The client disconnected: its jobs are cancelled and nobody reads the answer."""


class _Run:
    """The jobs of one request in flight: their events arrive, from the engine thread, on one queue."""

    def __init__(self, engine: Engine, tasks: List[Task]):
        self.tasks, self.engine = tasks, engine
        self.events: "asyncio.Queue" = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink_for(task: Task):
            def sink(kind, value):
                try:
                    loop.call_soon_threadsafe(self.events.put_nowait, (task, kind, value))
                except RuntimeError:  # the event loop closed (shutdown): nobody is listening
                    task.job.cancel()
            return sink

        for task in tasks:
            task.job.sink = sink_for(task)

    def submit(self) -> None:
        for task in self.tasks:
            self.engine.submit(task.job)

    def cancel(self) -> None:
        """Cancel the jobs (they leave the batch at the next step) and wake whoever waits on them."""
        for task in self.tasks:
            task.job.cancel()
        self.events.put_nowait((None, "cancelled", None))

    async def events_until_done(self) -> AsyncIterator[tuple]:
        """``(task, kind, value)`` until every task is done; an engine error is raised."""
        pending = len(self.tasks)
        while pending:
            task, kind, value = await self.events.get()
            if kind == "cancelled":
                raise _ClientGone()
            if kind == "error":
                raise value
            if kind == "done":
                pending -= 1
            yield task, kind, value

    def usage(self, n: int) -> dict:
        prompt = sum(t.prompt_tokens for t in self.tasks if t.index % n == 0)  # each prompt once
        completion = sum(t.job.produced for t in self.tasks)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _watch_disconnect(request: Request, run: _Run) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), type="server_error", code="shutting_down")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


def create_app(model, engine: Engine, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving ``model`` (a CPM1, CPM2 or EVA) through ``engine``; the engine stops when
    the app shuts down (after the server let the requests in flight finish)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engine.stop, 10)

    app = FastAPI(title="bminf", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    names = {model.model_key, model.version}
    endpoint = supported_endpoint(model)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = (f"no route {request.method} {request.url.path}; this server has GET /health, GET /v1/models "
                   f"and POST /v1/{endpoint}") if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(message, code="not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        _log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                            status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise APIError(401, "incorrect or missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def parse(request: Request, schema):
        authorize(request)
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = schema.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = [str(x) for x in first["loc"]]
            field = ".".join(loc)
            raise APIError(400, f"{field}: {first['msg']} (got {first.get('input')!r})"[:500],
                           param=loc[0] if loc else None) from exc
        if req.model not in names:
            raise APIError(404, f"model {req.model!r} does not exist here; this server runs "
                                f"{model.model_key!r} (version {model.version!r}), on POST /v1/{endpoint}",
                           param="model", code="model_not_found")
        return req

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.model_key, "version": model.version, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            authorize(request)
        except APIError as exc:
            return _error(exc)
        card = {"id": model.model_key, "object": "model", "created": 0, "owned_by": "bminf",
                "version": model.version, "endpoint": f"/v1/{endpoint}"}
        return {"object": "list", "data": [card]}

    async def handle(request: Request, schema, make_tasks, chat: bool):
        try:
            req = await parse(request, schema)
            tasks = await run_in_threadpool(make_tasks, model, req)  # tokenizing is CPU work
            run = _Run(engine, tasks)
            run.submit()
        except APIError as exc:
            return _error(exc)
        except ShuttingDown as exc:
            run.cancel()  # whatever was queued before the engine stopped
            return _error(_engine_error(exc))
        except (ValueError, TypeError) as exc:  # a check of the model's own, not mapped to a field
            return _error(APIError(400, str(exc)))
        rid = new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(request, run, rid, chat, req.n, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        texts: Dict[int, str] = {t.index: "" for t in tasks}
        try:
            async for task, kind, value in run.events_until_done():
                texts[task.index] += task.render(value) if kind == "output" else task.tail()
        except _ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except Exception as exc:  # noqa: BLE001 -- the engine's error, reported to this client only
            return _error(_engine_error(exc))
        finally:
            watcher.cancel()
            run.cancel()
        choices = []
        for t in sorted(tasks, key=lambda t: t.index):
            if chat:
                choice = {"index": t.index, "message": {"role": "assistant", "content": texts[t.index]}}
            else:
                choice = {"index": t.index, "text": texts[t.index], "logprobs": None}
                if t.blanks is not None:
                    choice["blanks"] = t.blanks()
            choices.append(dict(choice, finish_reason=t.finish_reason()))
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
                "model": model.model_key, "choices": choices, "usage": run.usage(req.n)}

    async def _stream(request: Request, run: _Run, rid: str, chat: bool, n: int, include_usage: bool):
        kind_name = "chat.completion.chunk" if chat else "text_completion"
        created = now()

        def chunk(choices, **extra) -> str:
            body = {"id": rid, "object": kind_name, "created": created, "model": model.model_key, "choices": choices}
            return f"data: {json.dumps(dict(body, **extra), ensure_ascii=False)}\n\n"

        def choice(task: Task, text: Optional[str], finish: Optional[str] = None) -> dict:
            if chat:
                return {"index": task.index, "delta": {} if text is None else {"content": text},
                        "finish_reason": finish}
            out = {"index": task.index, "text": text or "", "logprobs": None, "finish_reason": finish}
            if finish is not None and task.blanks is not None:
                out["blanks"] = task.blanks()
            return out

        watcher = asyncio.create_task(_watch_disconnect(request, run))
        try:
            if chat:
                yield chunk([{"index": t.index, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None} for t in run.tasks])
            async for task, kind, value in run.events_until_done():
                text = task.render(value) if kind == "output" else task.tail()
                if text:
                    yield chunk([choice(task, text)])
                if kind == "done":
                    yield chunk([choice(task, None, task.finish_reason())])
            if include_usage:
                yield chunk([], usage=run.usage(n))
        except _ClientGone:
            return
        except Exception as exc:  # noqa: BLE001 -- headers are sent: the error goes in the stream
            yield f"data: {json.dumps(_engine_error(exc).body())}\n\n"
        finally:
            watcher.cancel()
            run.cancel()  # the client left, or we are done: either way the slots are free
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, completion_tasks, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatRequest, chat_tasks, chat=True)

    return app


def serve(model, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, api_key: Optional[str] = None,
          drain_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serve ``model`` until SIGINT/SIGTERM; then stop taking requests, let the ones in flight finish for
    up to ``drain_timeout`` seconds, cancel the rest, and stop the engine. As uvicorn does, the signal is
    then raised again, so the process ends as that signal says (SIGINT: ``KeyboardInterrupt``)."""
    import uvicorn

    model.tokenizer.encode("你好")  # load jieba now, not in the first request
    engine = Engine(model.backbone, max_batch=max_batch, slots=None if model.cuda_graphs else False)
    engine.warm_up()  # the first requests find the decode step's kernels compiled
    engine.start()
    app = create_app(model, engine, api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop(timeout=10)
