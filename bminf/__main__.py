"""Command line: ``python -m bminf {convert,download,list} ...``."""
import argparse
import importlib
import sys

# subcommand -> (module defining add_<name>_arguments and run_<name>, help text)
_COMMANDS = {
    "convert": ("bminf.checkpoint.convert", "Convert a checkpoint between formats"),
    "download": ("bminf.hub", "Download a released model version into the cache"),
    "list": ("bminf.hub", "List released versions and what is cached"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m bminf")
    sub = parser.add_subparsers(dest="command", required=True)
    # import only the chosen command's module: the others may pull in torch or be slow to load
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            getattr(mod, f"add_{name}_arguments")(p)
            p.set_defaults(run=getattr(mod, f"run_{name}"))
    args = parser.parse_args(argv)
    return args.run(args) or 0

if __name__ == "__main__":
    sys.exit(main())
