"""Talk with EVA: one utterance per line on stdin, EVA's reply printed after each.

    python examples/dialogue.py                      # type; an empty line or Ctrl-D ends
    printf '你好\n推荐一本书\n' | python examples/dialogue.py --seed 0

The context holds both sides of the conversation. Without --version it uses the released eva-int8-new
when it is cached or can be downloaded, and the small demo checkpoint that ships with bminf otherwise.
"""
import argparse
import sys

import bminf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", help="eva-int8-new, eva-demo, file://DIR or a directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: the GPU if there is one)")
    parser.add_argument("--memory-limit", help="GPU memory budget, e.g. 6GiB")
    args = parser.parse_args()
    eva = bminf.models.EVA.available(args.version, device=args.device, memory_limit=args.memory_limit)
    interactive = sys.stdin.isatty()
    context = []
    while True:
        if interactive:
            print("你：", end="", flush=True)
        line = sys.stdin.readline().strip()
        if not line:
            break
        if not interactive:
            print(f"你：{line}")
        context.append(line)
        print("EVA：", end="", flush=True)
        reply = ""
        for piece in eva.dialogue(context, seed=args.seed, stream=True):
            reply += piece
            print(piece, end="", flush=True)
        print()
        context.append(reply)


if __name__ == "__main__":
    main()
