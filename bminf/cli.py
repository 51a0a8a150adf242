"""Command line: ``python -m bminf <command> ...``, also installed as the ``bminf`` script.

    bminf generate "天空是蔚蓝色，窗外有"    # CPM-1 continues a text (--model cpm2 for CPM-2)
    bminf fill-blank "今天<span>很好"       # CPM-2 fills the blanks
    bminf chat                           # talk with EVA (/reset, /quit)
    bminf serve --model cpm2             # serve a model with the OpenAI HTTP API (pip install bminf[server])
    bminf download cpm2.1-new            # fetch a released version into the cache
    bminf list                           # versions, cached files and sizes
    bminf convert SRC DST [--to hf]      # rewrite a checkpoint in another format

Every subcommand is one entry of ``COMMANDS``: its help text, its arguments, and the function that
runs it. The function imports the library modules it needs when it runs, so ``bminf list`` never
loads torch. To add a subcommand, write ``def cmd_<name>(args) -> int`` and add its entry.

>>> main(["list", "--cache-dir", "/tmp/empty-cache"])      # doctest: +SKIP
0
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "COMMANDS", "Command", "arg", "build_parser", "positive_float", "non_negative_int"]

# Kept here, not imported, so that parsing needs no heavy import; tests check them against the library.
CONVERT_FORMATS = ("bminf", "safetensors", "hf")
CONVERT_PRESETS = ("cpm1", "cpm2", "eva", "cpm1-new", "cpm2.1-new", "eva-int8-new", "cpm1-demo", "cpm2-demo", "eva-demo")
CONVERT_DTYPES = ("float16", "float32")

Arg = Tuple[Tuple[str, ...], dict]


def arg(*flags: str, **options) -> Arg:
    """One ``parser.add_argument(*flags, **options)`` call, written down for the table."""
    return flags, options


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], int]
    help: str
    arguments: Tuple[Arg, ...] = ()


def positive_float(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a count >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _error(command: str, exc: BaseException) -> int:
    print(f"bminf {command}: error: {exc}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- models: generate, fill-blank, chat

_MODEL_CLASSES = {"cpm1": "CPM1", "cpm2": "CPM2", "eva": "EVA"}


def _load(args: argparse.Namespace, key: str):
    """The model of ``key`` as the flags ask (without --version: the release, else the shipped demo)."""
    import bminf

    cls = getattr(bminf.models, _MODEL_CLASSES[key])
    extra = {"dynamic_memory": args.dynamic_memory} if getattr(args, "dynamic_memory", None) else {}
    if getattr(args, "no_cuda_graphs", False):
        extra["cuda_graphs"] = False
    return cls.available(args.version, device=args.device, dtype=args.dtype, memory_limit=args.memory_limit,
                         **extra)


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling flags given on the command line; the rest keep the task method's defaults."""
    names = ("max_tokens", "temperature", "top_n", "top_p", "frequency_penalty", "presence_penalty", "seed")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _stream(args: argparse.Namespace) -> bool:
    return sys.stdout.isatty() if args.stream is None else args.stream


def _inputs(args: argparse.Namespace) -> List[str]:
    # the text on the command line, else one input per non-empty line of stdin
    return [args.text] if args.text is not None else [line.rstrip("\n") for line in sys.stdin if line.strip()]


def _print_stream(pieces) -> None:
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        model = _load(args, args.model)
        for text in _inputs(args):
            options = dict(_sampling(args), stop_tokens=args.stop or None)
            if _stream(args):
                print(text, end="", flush=True)
                _print_stream(model.generate(text, stream=True, **options))
            else:
                print(text + model.generate(text, **options)[0])
    except (ValueError, TypeError, OSError) as exc:
        return _error("generate", exc)
    return 0


def _filled(text: str, blanks: list, color: bool) -> str:
    from .models.cpm2 import fill_in
    return fill_in(text, blanks, (lambda t: f"\033[0;32m{t}\033[0m") if color else None)


def cmd_fill_blank(args: argparse.Namespace) -> int:
    import json

    try:
        model = _load(args, "cpm2")
        for text in _inputs(args):
            if _stream(args):  # each blank's text as it comes, then the filled sentence
                blanks = {}
                for piece in model.fill_blank(text, stream=True, **_sampling(args)):
                    blanks[piece["position"]] = blanks.get(piece["position"], "") + piece["text"]
                    print(piece["text"], end="", flush=True)
                print()
                result = [{"position": p, "text": t} for p, t in blanks.items()]
            else:
                result = model.fill_blank(text, **_sampling(args))
            print(json.dumps(result, ensure_ascii=False) if args.json else
                  _filled(text, result, color=sys.stdout.isatty()))
    except (ValueError, TypeError, OSError) as exc:
        return _error("fill-blank", exc)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        model = _load(args, "eva")
    except (ValueError, TypeError, OSError) as exc:
        return _error("chat", exc)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with EVA. /reset starts over, /quit leaves.", file=sys.stderr)
    context: List[str] = []
    while True:
        if interactive:
            print("你：", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            context = []
            print("(context cleared)", file=sys.stderr)
            continue
        context.append(line)
        try:
            if _stream(args):
                print("EVA：", end="", flush=True)
                reply = ""
                for piece in model.dialogue(context, stream=True, **_sampling(args)):
                    reply += piece
                    print(piece, end="", flush=True)
                print()
            else:
                reply = model.dialogue(context, **_sampling(args))[0]
                print(f"EVA：{reply}")
        except (ValueError, TypeError) as exc:
            context.pop()
            _error("chat", exc)
            continue
        context.append(reply)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from bminf.serving.app import serve
    except ImportError as exc:
        return _error("serve", ImportError(f"{exc}; the server needs: pip install 'bminf[server]'"))
    if args.max_batch < 1:
        return _error("serve", ValueError(f"--max-batch must be >= 1, got {args.max_batch}"))
    import logging

    # a server's log says where the blocks went and when a budget's reserve grows (uvicorn logs the rest)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logging.getLogger("bminf").addHandler(handler)
    logging.getLogger("bminf").setLevel(logging.INFO)
    try:
        model = _load(args, args.model)
    except (ValueError, TypeError, OSError) as exc:
        return _error("serve", exc)
    try:
        serve(model, host=args.host, port=args.port, max_batch=args.max_batch, api_key=args.api_key,
              drain_timeout=args.drain_timeout)
    except KeyboardInterrupt:  # Ctrl-C: the server has drained and stopped; no traceback
        return 130
    return 0


# ---------------------------------------------------------------- hub: download, list


def cmd_download(args: argparse.Namespace) -> int:
    from bminf import hub

    for version in args.versions:
        try:
            directory = hub.download(version, force=args.force, source=args.source, cache_dir=args.cache_dir,
                                     timeout=args.timeout or hub.DEFAULT_TIMEOUT, retries=args.retries,
                                     progress=False if args.no_progress else None)
        except (ValueError, OSError) as exc:  # DownloadError and NotCachedError are OSErrors
            return _error("download", exc)
        print(f"{version}: {directory}")
    return 0


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size} B"


def cmd_list(args: argparse.Namespace) -> int:
    from bminf import hub

    root = os.path.abspath(os.path.expanduser(args.cache_dir or hub.get_cache_path()))
    cached: Dict[Tuple[str, str], List[hub.CachedFile]] = {}
    for f in hub.list_cached(root):
        cached.setdefault((f.version, f.name), []).append(f)
    print(f"cache:  {root}\nsource: {hub.get_source()}" + ("  (offline)" if hub.is_offline() else ""))
    others = sorted({version for version, _ in cached} - set(hub.VERSIONS))
    for version in list(hub.VERSIONS) + others:
        print(version + ("" if version in hub.VERSIONS else "  (not a known version)"))
        names = [r.name for r in hub.VERSIONS.get(version, ())] + sorted(n for v, n in cached if v == version)
        for name in dict.fromkeys(names):
            files = cached.get((version, name), [])
            for f in files:
                hint = f" (resume: python -m bminf download {version})" if f.status == "partial" else ""
                print(f"  {name:<16} {_human(f.size):>10}  {f.status}{hint}")
            if not files:
                print(f"  {name:<16} {'':>10}  not cached")
    return 0


# ---------------------------------------------------------------- checkpoints: convert


def cmd_convert(args: argparse.Namespace) -> int:
    from bminf.checkpoint.convert import convert, read_config
    from bminf.units import parse_dtype

    start = time.time()
    try:
        config = read_config(args.config, args.src) if args.config else None
        result = convert(args.src, args.dst, to=args.to, preset=args.preset, quantize=not args.no_quantize,
                         dtype=parse_dtype(args.dtype) if args.dtype else None, config=config, force=args.force)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        return _error("convert", exc)
    for note in result.notes:
        print(f"note: {note}")
    print(f"converted {args.src} ({result.src_format}) -> {result.path} ({result.format}): {result.description}, "
          f"{time.time() - start:.1f} s")
    return 0


# ---------------------------------------------------------------- the table

_CACHE_DIR = arg("--cache-dir", help="cache directory (default: $BMINF_CACHE, else ~/.cache/bigmodels)")

_MODEL_ARGS = (
    arg("--version", help="a released version (downloaded once), a demo (cpm1-demo, cpm2-demo, eva-demo), file://DIR "
                          "or a directory; default: the release if cached or downloadable, else the demo"),
    arg("--device", help="cpu, cuda or cuda:N (default: the current GPU, else the CPU)"),
    arg("--dtype", help="float16, bfloat16 or float32 (default: float16 on a GPU, float32 on a CPU)"),
    arg("--memory-limit", help="GPU memory to stay within, e.g. 6GiB: blocks that do not fit stream from host memory"),
    arg("--max-tokens", type=int, help="most tokens to generate"),
    arg("--temperature", type=float, help="0 = greedy; higher is more random"),
    arg("--top-n", type=int, help="sample among the n likeliest tokens"),
    arg("--top-p", type=float, help="sample among the likeliest tokens holding this much probability"),
    arg("--frequency-penalty", type=float, help="lower a token's score by this much per earlier use"),
    arg("--presence-penalty", type=float, help="lower a token's score by this much once it was used"),
    arg("--seed", type=int, help="make sampling reproducible"),
    arg("--stream", action=argparse.BooleanOptionalAction, default=None,
        help="print text as it is generated (default: when the output is a terminal)"),
)
_TEXT = arg("text", nargs="?", help="the input; without it, one input per line of stdin")

COMMANDS: Dict[str, Command] = {
    "generate": Command(cmd_generate, "Continue a text with CPM-1 (or CPM-2)", (
        _TEXT, arg("--model", choices=("cpm1", "cpm2"), default="cpm1", help="which model (default cpm1)"),
        arg("--stop", action="append", metavar="TEXT", help="end the text before this string (repeatable)"),
    ) + _MODEL_ARGS),
    "fill-blank": Command(cmd_fill_blank, "Fill the <span> blanks of a text with CPM-2", (
        _TEXT, arg("--json", action="store_true", help="print the blanks as JSON instead of the filled text"),
    ) + _MODEL_ARGS),
    "chat": Command(cmd_chat, "Talk with EVA, one utterance per line (/reset starts over, /quit leaves)",
                    _MODEL_ARGS),
    "serve": Command(cmd_serve, "Serve a model over HTTP with the OpenAI API (completions: cpm1, cpm2; chat: eva)", (
        arg("--model", choices=("cpm1", "cpm2", "eva"), default="cpm2", help="which model (default cpm2)"),
        arg("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"),
        arg("--port", type=int, default=8000, help="port (default 8000)"),
        arg("--max-batch", type=int, default=16, help="most requests decoded together (default 16)"),
        arg("--no-cuda-graphs", action="store_true",
            help="decode eagerly, without CUDA graphs (slower; to compare or debug)"),
        arg("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes"),
        arg("--drain-timeout", type=float, default=30.0,
            help="on SIGINT/SIGTERM, seconds to let requests in flight finish before cancelling them"),
        arg("--dynamic-memory", help="with --memory-limit: the part of it kept for activations and the KV caches "
                                     "of every request in flight (default 512MiB; it grows when a batch needs more)"),
    ) + _MODEL_ARGS[:4]),
    "download": Command(cmd_download, "Download a released model version into the cache", (
        arg("versions", nargs="+", metavar="VERSION", help="a released version (bminf list shows them)"),
        arg("--source", help="mirror base URL (default: $BMINF_SOURCE, else the BMInf server)"),
        _CACHE_DIR,
        arg("--force", action="store_true", help="download again even if already cached"),
        arg("--timeout", type=positive_float, help="seconds to wait to connect and between reads (default 10, 60)"),
        arg("--retries", type=non_negative_int, default=5, help="attempts in a row without progress before giving up"),
        arg("--no-progress", action="store_true", help="no progress bar"),
    )),
    "list": Command(cmd_list, "List released versions and what is cached", (_CACHE_DIR,)),
    "convert": Command(cmd_convert, "Convert a checkpoint between formats", (
        arg("src", help="checkpoint.pt or its directory (BMInf), a bminf directory, or an HF CPM-1 directory"),
        arg("dst", help="output: a file ending in .pt or a directory"),
        arg("--to", choices=CONVERT_FORMATS,
            help="output format (default: bminf if DST ends in .pt, else safetensors)"),
        arg("--preset", choices=CONVERT_PRESETS,
            help="the model, for what a BMInf file cannot tell (head count, eps, max_distance)"),
        arg("--no-quantize", action="store_true",
            help="keep (or make) the linears float; not possible with --to bminf"),
        arg("--dtype", choices=CONVERT_DTYPES,
            help="float dtype of the output (HF output: float32 unless given; bminf: float16 only)"),
        arg("--config", metavar="CONFIG_JSON",
            help="a JSON object of GPTConfig or T5Config fields, for a BMInf file of a size no preset has"),
        arg("--force", action="store_true", help="overwrite DST if it exists"),
    )),
}


def build_parser(commands: Optional[Dict[str, Command]] = None) -> argparse.ArgumentParser:
    """The parser for every subcommand of ``commands`` (default ``COMMANDS``)."""
    parser = argparse.ArgumentParser(prog="bminf", description="Big pretrained Chinese language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in (commands or COMMANDS).items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        for flags, options in command.arguments:
            p.add_argument(*flags, **options)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        status = args.run(args) or 0
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`bminf list | head`): stop quietly, and keep the interpreter's final
        # flush of stdout from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status
